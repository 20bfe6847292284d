"""Clustered and paired intervals against hand-computed cases (flan/stats.py)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from flan.metrics import corpus_bleu, mean_score
from flan.stats import Estimate, Z95, bootstrap_stderr, mean_of_independent, paired_difference, template_mean

A = {0: {1: 1.0, 2: 0.0, 3: 1.0}, 1: {1: 1.0, 2: 1.0, 3: 0.0}}
B = {0: {1: 0.0, 2: 0.0, 3: 1.0}, 1: {1: 0.0, 2: 1.0, 3: 0.0}}


def test_template_mean_clusters_by_example():
    # example averages u = (1, .5, .5): mean 2/3, std(ddof=1) = sqrt(1/12), stderr = sqrt(1/12) / sqrt(3) = 1/6
    m = template_mean(A)
    assert m.value == pytest.approx(200 / 3) and m.stderr == pytest.approx(100 / 6) and m.n == 3


def test_identical_templates_do_not_shrink_the_error():
    # T copies of one template carry one template's information: the naive sqrt(sum se^2) / T would be
    # sqrt(T) times smaller
    one = {0: {1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0}}
    copies = {t: dict(one[0]) for t in range(4)}
    assert template_mean(copies).stderr == pytest.approx(template_mean(one).stderr)
    assert template_mean(one).stderr == pytest.approx(mean_score([1, 0, 1, 0]).stderr)


def test_paired_difference_by_example():
    # d = u_A - u_B = (1, 0, 0): mean 1/3, std(ddof=1) = sqrt(1/3), stderr = 1/3
    d = paired_difference(A, B)
    assert d.value == pytest.approx(100 / 3) and d.stderr == pytest.approx(100 / 3)
    assert d.half_width == pytest.approx(Z95 * 100 / 3) and d.within_noise
    assert not Estimate(10.0, 1.0, 50).within_noise


def test_mean_over_datasets_adds_variances():
    c = mean_of_independent([Estimate(60.0, 3.0, 10), Estimate(40.0, 4.0, 20)])
    assert c.value == 50.0 and c.stderr == pytest.approx(2.5) and c.n == 30


def test_mismatched_examples_are_refused():
    with pytest.raises(ValueError, match="same ones"):
        template_mean({0: {1: 1.0}, 1: {2: 1.0}})
    with pytest.raises(ValueError, match="same ones"):
        paired_difference(A, {0: {9: 1.0}})


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=6, max_size=6), min_size=1, max_size=4))
def test_paired_difference_with_itself_is_zero_and_clustered_error_bounds(values):
    per = {t: dict(enumerate(v)) for t, v in enumerate(values)}
    assert paired_difference(per, per).value == 0.0 and paired_difference(per, per).stderr == 0.0
    # averaging over templates never makes the clustered error exceed the largest single template's
    # (std of a mean of columns <= mean of stds)
    single = [template_mean({0: per[t]}).stderr for t in per]
    assert template_mean(per).stderr <= max(single) + 1e-9


def test_bootstrap_is_seeded_and_paired():
    preds, refs = ["a b c d", "e f g h", "a b x y"], ["a b c d", "e f g z", "a b c d"]

    def bleu(idx):
        return corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx])

    first = bootstrap_stderr(bleu, 3)
    assert first == bootstrap_stderr(bleu, 3) and first > 0
    assert bootstrap_stderr(lambda idx: bleu(idx) - bleu(idx), 3) == 0.0  # same resample for both sides
    assert math.isclose(bootstrap_stderr(bleu, 1), 0.0)
