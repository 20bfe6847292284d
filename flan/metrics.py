"""Metrics of the zero-shot scorer, each with a standard error; values in percent (0-100, BLEU's own scale).

    rank_metrics(results, golds)          # acc, acc_norm_token, acc_norm_byte (binomial stderr)
    generation_metrics("f1", preds, refs) # exact_match + f1 (SQuAD normalisation), or bleu, or rouge1/2/L

Each example has one or more references (QA rows list every accepted answer): exact match and F1 take the
best over them, as SQuAD's script does; BLEU and ROUGE use the first (the target the template renders).

Which metrics a dataset gets follows its registry `metric`: accuracy -> rank accuracy (exact match for a
generated answer), exact_match / f1 -> both SQuAD metrics, bleu -> sacrebleu corpus BLEU, rouge ->
rouge-score ROUGE-1/2/L F-measure. A mean over examples gets std / sqrt(n) as its standard error; corpus
BLEU, which is no mean, gets a seeded bootstrap over examples (flan/stats.py). The per-example values
(`rank_per_example`, `generation_per_example`) feed the samples files and the clustered intervals.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

@dataclass(frozen=True)
class Score:
    value: float    # percent
    stderr: float
    n: int


def mean_score(per_example: Sequence[float]) -> Score:
    """Mean of per-example values in [0, 1] as percent, stderr = sample std / sqrt(n)."""
    x = np.asarray(per_example, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no examples to score")
    stderr = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return Score(100.0 * float(x.mean()), 100.0 * stderr, n)


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> Score:
    """Percent correct with the binomial standard error sqrt(p (1 - p) / n)."""
    n = len(golds)
    if n == 0 or len(predictions) != n:
        raise ValueError(f"accuracy needs as many predictions ({len(predictions)}) as golds ({n}), at least one")
    p = sum(int(a == b) for a, b in zip(predictions, golds)) / n
    return Score(100.0 * p, 100.0 * math.sqrt(p * (1 - p) / n), n)


PREDICTIONS = {"acc": "prediction", "acc_norm_token": "prediction_per_token", "acc_norm_byte": "prediction_per_byte"}
"""Each rank metric and the RankResult property that predicts under its normalisation."""


def rank_predictions(result) -> dict[str, int]:
    """The option each rank metric picks for one result (summed, per-token, per-byte log-probability)."""
    return {name: getattr(result, attr) for name, attr in PREDICTIONS.items()}


def rank_per_example(results, golds: Sequence[int]) -> dict[str, list[float]]:
    """1.0 where the metric's prediction is the gold option, else 0.0, per example."""
    return {name: [float(getattr(r, attr) == g) for r, g in zip(results, golds)] for name, attr in PREDICTIONS.items()}


def rank_metrics(results, golds: Sequence[int]) -> dict[str, Score]:
    """Accuracy of rank classification: summed log-prob, per-token and per-byte normalised (acc_norm)."""
    return {name: accuracy([getattr(r, attr) for r in results], golds) for name, attr in PREDICTIONS.items()}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of words, SQuAD's F1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    per = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: [s[k].fmeasure for s in per] for k in kinds}


def best_over(score, prediction: str, references: Sequence[str]) -> float:
    return max(score(prediction, r) for r in references)


def _check_generation(predictions, references) -> None:
    if len(predictions) != len(references) or not predictions or not all(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; need equal "
                         "counts, at least one example, and at least one reference per example")


def generation_per_example(metric: str, predictions: Sequence[str],
                           references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Each example's value of every metric that is a mean over examples (all but corpus BLEU), in [0, 1]."""
    _check_generation(predictions, references)
    out = {"exact_match": [best_over(exact_match, p, r) for p, r in zip(predictions, references)]}
    if metric in ("exact_match", "f1"):
        out["f1"] = [best_over(token_f1, p, r) for p, r in zip(predictions, references)]
    elif metric == "bleu":
        out = {}
    elif metric == "rouge":
        out = rouge_per_example(predictions, [r[0] for r in references])
    elif metric != "accuracy":
        raise ValueError(f"unknown metric {metric!r}; accepted: accuracy, exact_match, f1, bleu, rouge")
    return out


def generation_metrics(metric: str, predictions: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict[str, Score]:
    """The metrics of a generation dataset whose registry metric is `metric`; references[i] lists the
    accepted answers of example i (at least one)."""
    from flan.stats import bootstrap_stderr

    out = {name: mean_score(values) for name, values in generation_per_example(metric, predictions, references).items()}
    if metric == "bleu":
        first = [r[0] for r in references]

        def resampled(idx) -> float:
            return corpus_bleu([predictions[i] for i in idx], [first[i] for i in idx])

        out["bleu"] = Score(corpus_bleu(predictions, first), bootstrap_stderr(resampled, len(predictions)),
                            len(predictions))
    return out


def primary_metric(metric: str, ranked: bool) -> str:
    """The one number per dataset that cluster averages and plots use."""
    if ranked:
        return "acc"
    return {"accuracy": "exact_match", "exact_match": "exact_match", "f1": "f1", "bleu": "bleu",
            "rouge": "rougeL"}[metric]
