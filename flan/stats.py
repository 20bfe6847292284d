"""Intervals for evaluation scores whose templates share their examples.

    m = template_mean({0: {7: 1.0, 9: 0.0}, 1: {7: 1.0, 9: 1.0}})      # Estimate(value, stderr, n): percent
    d = paired_difference(tuned_by_template, base_by_template)        # tuned - base, paired by example
    c = mean_of_independent([m_rte, m_cb])                            # a cluster: datasets share no example
    s = bootstrap_stderr(lambda idx: corpus_bleu(...), n)             # a statistic that is no mean (BLEU)

Every template of a dataset scores the same examples, so per-template results are not independent samples:
an example that is hard is hard under every template. The mean over T templates is the mean over examples
of each example's template average u_i = (1/T) sum_t x_ti, so its standard error is that of a mean of n
independent values, std(u, ddof=1) / sqrt(n) (a cluster-robust standard error with the example as cluster).
A tuned-vs-base difference pairs the same way: d_i = u_i(tuned) - u_i(base), stderr std(d, ddof=1) / sqrt(n).
Datasets hold different examples, so a mean over D datasets has stderr sqrt(sum se_d^2) / D. Intervals are
the normal 95% one, estimate +- 1.96 stderr; a difference is "within noise" when its interval contains 0.
Values come in [0, 1] per example (or any scale) and leave as percent when `percent` is set (the default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

Z95 = 1.959963984540054  # the normal distribution's 97.5th percentile
BOOTSTRAP_RESAMPLES = 200


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the width of the 95% interval."""
        return Z95 * self.stderr

    @property
    def within_noise(self) -> bool:
        """Whether the 95% interval of a difference contains zero."""
        return abs(self.value) <= self.half_width


PerTemplate = Mapping[int, Mapping[int, float]]
"""template index -> {example id -> that example's value under the template}."""


def example_averages(per_template: PerTemplate) -> dict[int, float]:
    """Each example's average over the templates (all templates must score the same examples)."""
    templates = list(per_template.values())
    if not templates or not templates[0]:
        raise ValueError("no templates or no examples to average")
    ids = set(templates[0])
    if any(set(t) != ids for t in templates):
        raise ValueError("the templates scored different examples; a clustered mean needs the same ones")
    return {i: float(np.mean([t[i] for t in templates])) for i in sorted(ids)}


def _mean_of(values: Sequence[float], scale: float) -> Estimate:
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return Estimate(scale * float(x.mean()), scale * se, len(x))


def template_mean(per_template: PerTemplate, percent: bool = True) -> Estimate:
    """Mean over templates with its standard error clustered by example (module docstring)."""
    return _mean_of(list(example_averages(per_template).values()), 100.0 if percent else 1.0)


def paired_difference(a: PerTemplate, b: PerTemplate, percent: bool = True) -> Estimate:
    """a - b of the template means, paired by example (both must score the same examples)."""
    ua, ub = example_averages(a), example_averages(b)
    if set(ua) != set(ub):
        raise ValueError("the two models scored different examples; a paired difference needs the same ones")
    return _mean_of([ua[i] - ub[i] for i in ua], 100.0 if percent else 1.0)


def mean_of_independent(parts: Sequence[Estimate]) -> Estimate:
    """The mean of estimates over disjoint examples (a cluster's datasets): stderr sqrt(sum se^2) / D."""
    if not parts:
        raise ValueError("no estimates to average")
    d = len(parts)
    return Estimate(float(np.mean([p.value for p in parts])), math.sqrt(sum(p.stderr ** 2 for p in parts)) / d,
                    sum(p.n for p in parts))


def bootstrap_stderr(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> float:
    """Std of statistic(idx) over seeded resamples idx of range(n) with replacement. A statistic of several
    templates or of two models must apply the same idx to all of them (a paired bootstrap)."""
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    return float(np.std([statistic(rng.integers(0, n, n)) for _ in range(resamples)], ddof=1))
