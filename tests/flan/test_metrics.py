"""Metrics against hand-computed values: accuracy and its binomial stderr, SQuAD normalisation, EM and F1,
BLEU and ROUGE at their extremes (bootstrap determinism: tests/flan/test_stats.py), and the dataset-to-metric mapping."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from flan.metrics import (accuracy, corpus_bleu, exact_match, generation_metrics, mean_score,
                          normalize_answer, primary_metric, rank_metrics, token_f1)
from flan.scorer import RankResult


def test_accuracy_and_binomial_stderr():
    s = accuracy([0, 1, 1, 0], [0, 1, 0, 0])
    assert s.value == 75.0 and s.n == 4
    assert s.stderr == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 4))
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy([0], [0, 1])


def test_rank_metrics_use_each_normalisation():
    results = [RankResult((-3.0, -4.0), (1, 4), (1, 20)), RankResult((-2.0, -1.0), (1, 1), (3, 3))]
    m = rank_metrics(results, [1, 1])
    assert m["acc"].value == 50.0  # first picks option 0 by sum
    assert m["acc_norm_token"].value == 100.0  # -4/4 > -3/1
    assert m["acc_norm_byte"].value == 100.0  # -4/20 > -3/1


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_token_f1_by_hand():
    assert exact_match("the Cat.", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    # pred {cat, sat}, ref {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "cat") == 0.0  # "a" normalises to nothing
    assert token_f1("dog", "cat") == 0.0


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="ab c.", max_size=12), st.text(alphabet="ab c.", max_size=12))
def test_f1_is_symmetric_bounded_and_one_on_equal_bags(a, b):
    f = token_f1(a, b)
    assert 0.0 <= f <= 1.0 and f == pytest.approx(token_f1(b, a))
    if sorted(normalize_answer(a).split()) == sorted(normalize_answer(b).split()):
        assert f == 1.0


def test_mean_score_stderr():
    s = mean_score([1.0, 0.0, 1.0, 0.0])
    assert s.value == 50.0 and s.stderr == pytest.approx(100 * math.sqrt(1 / 3) / 2)


def test_bleu_and_rouge_extremes():
    refs = ["the cat is on the mat today", "there is a book on the desk now"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)
    assert corpus_bleu(["zz yy xx ww vv", "qq rr ss tt uu"], refs) == pytest.approx(0.0)
    same = generation_metrics("rouge", refs, [[r] for r in refs])
    assert set(same) == {"rouge1", "rouge2", "rougeL"} and all(s.value == pytest.approx(100.0) for s in same.values())
    assert generation_metrics("rouge", ["zz", "qq"], [[r] for r in refs])["rougeL"].value == 0.0


def test_qa_metrics_take_the_best_reference():
    m = generation_metrics("f1", ["December 1972", "one"], [["14 December 1972 UTC", "December 1972"], ["two"]])
    assert m["exact_match"].value == 50.0 and m["f1"].value == 50.0
    with pytest.raises(ValueError, match="at least one reference per example"):
        generation_metrics("f1", ["x"], [[]])


def test_metric_sets_follow_the_registry_metric():
    assert set(generation_metrics("f1", ["x"], [["x"]])) == {"exact_match", "f1"}
    assert set(generation_metrics("exact_match", ["x"], [["x"]])) == {"exact_match", "f1"}
    assert set(generation_metrics("bleu", ["x y z w"], [["x y z w"]])) == {"bleu"}
    assert set(generation_metrics("accuracy", ["x"], [["x"]])) == {"exact_match"}
    with pytest.raises(ValueError, match="unknown metric 'meteor'"):
        generation_metrics("meteor", ["x"], [["x"]])
    assert primary_metric("accuracy", ranked=True) == "acc" and primary_metric("rouge", ranked=False) == "rougeL"
