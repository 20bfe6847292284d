"""Metrics of the zero-shot scorer, each with a standard error; values in percent (0-100, BLEU's own scale).

    rank_metrics(results, golds)          # acc, acc_norm_token, acc_norm_byte (binomial stderr)
    generation_metrics("f1", preds, refs) # exact_match + f1 (SQuAD normalisation), or bleu, or rouge1/2/L

Each example has one or more references (QA rows list every accepted answer): exact match and F1 take the
best over them, as SQuAD's script does; BLEU and ROUGE use the first (the target the template renders).

Which metrics a dataset gets follows its registry `metric`: accuracy -> rank accuracy (exact match for a
generated answer), exact_match / f1 -> both SQuAD metrics, bleu -> sacrebleu corpus BLEU, rouge ->
rouge-score ROUGE-1/2/L F-measure. A mean over examples gets std / sqrt(n) as its standard error; corpus
BLEU, which is no mean, gets a seeded bootstrap over examples.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 200


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


def rank_metrics(results, golds: Sequence[int]) -> dict[str, Score]:
    """Accuracy of rank classification: summed log-prob, per-token and per-byte normalised (acc_norm)."""
    return {
        "acc": accuracy([r.prediction for r in results], golds),
        "acc_norm_token": accuracy([r.prediction_per_token for r in results], golds),
        "acc_norm_byte": accuracy([r.prediction_per_byte for r in results], golds),
    }


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


def bootstrap_stderr(statistic, predictions: Sequence[str], references: Sequence[str], seed: int = 0) -> float:
    """Std of `statistic` over seeded resamples (with replacement) of the examples."""
    n = len(predictions)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        idx = rng.integers(0, n, n)
        values.append(statistic([predictions[i] for i in idx], [references[i] for i in idx]))
    return float(np.std(values, ddof=1))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Score]:
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    per = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: mean_score([s[k].fmeasure for s in per]) for k in kinds}


def best_over(score, prediction: str, references: Sequence[str]) -> float:
    return max(score(prediction, r) for r in references)


def generation_metrics(metric: str, predictions: Sequence[str],
                       references: Sequence[Sequence[str]]) -> dict[str, Score]:
    """The metrics of a generation dataset whose registry metric is `metric`; references[i] lists the
    accepted answers of example i (at least one)."""
    if len(predictions) != len(references) or not predictions or not all(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists; need equal "
                         "counts, at least one example, and at least one reference per example")
    em = [best_over(exact_match, p, r) for p, r in zip(predictions, references)]
    if metric in ("exact_match", "f1"):
        return {"exact_match": mean_score(em),
                "f1": mean_score([best_over(token_f1, p, r) for p, r in zip(predictions, references)])}
    if metric == "accuracy":
        return {"exact_match": mean_score(em)}
    first = [r[0] for r in references]
    if metric == "bleu":
        return {"bleu": Score(corpus_bleu(predictions, first), bootstrap_stderr(corpus_bleu, predictions, first),
                              len(predictions))}
    if metric == "rouge":
        return rouge_scores(predictions, first)
    raise ValueError(f"unknown metric {metric!r}; accepted: accuracy, exact_match, f1, bleu, rouge")


def primary_metric(metric: str, ranked: bool) -> str:
    """The one number per dataset that cluster averages and plots use."""
    if ranked:
        return "acc"
    return {"accuracy": "exact_match", "exact_match": "exact_match", "f1": "f1", "bleu": "bleu",
            "rouge": "rougeL"}[metric]
