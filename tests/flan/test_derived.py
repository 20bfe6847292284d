"""Derived datasets: fix_punct from the corpus and linear_1d algebra, both deterministic from the seed."""
import re

import pytest
import sympy

from flan.derived import corpus_sentences, generate, strip_punctuation


def test_math_problems_are_correct_and_seeded(shared_data):
    rows = generate("math_dataset", "train", 200, seed=7, data_dir=shared_data)
    assert rows == generate("math_dataset", "train", 200, seed=7, data_dir=shared_data)
    assert rows != generate("math_dataset", "train", 200, seed=8, data_dir=shared_data)
    for row in rows:
        m = re.fullmatch(r"Solve (.+) = (.+) for ([a-z])\.", row["question"])
        assert m, row
        left, right, var = m.groups()
        x = sympy.Symbol(var)
        assert sympy.solve(sympy.sympify(left, locals={var: x}) - sympy.sympify(right, locals={var: x}), x) == \
            [int(row["answer"])]
        assert "+ -" not in row["question"] and not re.search(r"(?<!\d)1\*", row["question"]), "DeepMind style"


def test_fix_punct_pairs_real_sentences_with_stripped_copies(shared_data):
    rows = generate("fix_punct", "validation", 100, seed=3, data_dir=shared_data)
    assert rows == generate("fix_punct", "validation", 100, seed=3, data_dir=shared_data)
    corpus = set(corpus_sentences(shared_data / "corpus" / "valid.txt"))
    for row in rows:
        assert row["sentence"] in corpus
        assert row["no_punct"] == strip_punctuation(row["sentence"])
        assert row["no_punct"] == row["no_punct"].lower() and not re.search(r"[^\w\s]", row["no_punct"])
    train = {r["sentence"] for r in generate("fix_punct", "train", 500, seed=3, data_dir=shared_data)}
    assert not train & {r["sentence"] for r in rows}, "train and validation come from different corpus files"


def test_strip_punctuation():
    assert strip_punctuation('He said, "Well-known (U.S.) facts!"') == "he said well known us facts"


def test_too_many_sentences_requested_is_a_clear_error(shared_data):
    with pytest.raises(ValueError, match=r"usable sentences for fix_punct validation, 100000 requested"):
        generate("fix_punct", "validation", 100000, seed=0, data_dir=shared_data)
