"""Datasets FLAN built rather than downloaded, generated deterministically from a seed.

    rows = generate("fix_punct", "train", n=3000, seed=1234, data_dir=shared_data_dir())

- fix_punct: real English sentences from the WikiText corpus (../shared/data/corpus), detokenised,
  with punctuation and case removed as the input and the original sentence as the target (FLAN built it
  from ParaCrawl's English side; the corpus is our stand-in). train uses corpus/train.txt, validation
  corpus/valid.txt, so the two never share a sentence.
- math_dataset: DeepMind's algebra__linear_1d family, "Solve 12*p = -9*p + 21 for p." with an integer
  answer, from a small generator of our own (the `mathematics-dataset` package pins sympy 1.5, which
  torch's sympy requirement excludes).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from engine.errors import FlanError

CORPUS_FILES = {"train": "train.txt", "validation": "valid.txt"}
# WikiText splits numbers and hyphenated words with @-@ style tokens and spaces out punctuation.
_WIKI_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]%])")
_SPACE_AFTER = re.compile(r"([(\[$]) ")
_QUOTED = re.compile(r'" ([^"]*?) "')
_CLITIC = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z])")
_PUNCT = re.compile(r"[^\w\s]")
# Letters DeepMind's generator uses for unknowns are arbitrary; skip e, i, o (easily read as numbers).
_VARIABLES = "abcdfghjklmnpqrstuvwxyz"


class DerivedDataError(FlanError, ValueError):
    """A derived dataset (fix_punct, math_dataset) that cannot be generated; names the source and why."""


def detokenize_wikitext(line: str) -> str:
    text = line.strip()
    for old, new in _WIKI_JOINS:
        text = text.replace(old, new)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _QUOTED.sub(r'"\1"', text)
    return _CLITIC.sub(r"\1", text)


def strip_punctuation(sentence: str) -> str:
    """Lower-case words with every punctuation mark removed (hyphens become spaces)."""
    return " ".join(_PUNCT.sub("", sentence.replace("-", " ")).lower().split())


def corpus_sentences(path: Path) -> list[str]:
    """Clean sentences of 6-40 words from a WikiText file: no headings, no <unk>, balanced quotes."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.strip().startswith("="):
            continue
        for sentence in _SENTENCE_END.split(detokenize_wikitext(line)):
            clean = "<unk>" not in sentence and sentence.count('"') % 2 == 0 and sentence[-1:] in ".!?"
            if clean and 6 <= len(sentence.split()) <= 40:
                out.append(sentence)
    return out


def fix_punct_rows(split: str, n: int, seed: int, data_dir: Path) -> list[dict]:
    path = Path(data_dir) / "corpus" / CORPUS_FILES[split]
    if not path.is_file():
        raise DerivedDataError(f"{path}: the English corpus fix_punct is built from is missing")
    sentences = corpus_sentences(path)
    if len(sentences) < n:
        raise DerivedDataError(f"{path}: only {len(sentences)} usable sentences for fix_punct {split}, "
                               f"{n} requested; lower [derived] {split} in flan/tasks/fix_punct.toml")
    chosen = random.Random(f"fix_punct:{split}:{seed}").sample(sentences, n)
    return [{"no_punct": strip_punctuation(s), "sentence": s} for s in chosen]


def _linear(terms: list[tuple[int, str]]) -> str:
    """Terms (coefficient, variable or "") as DeepMind writes them: "-9*p + 21", "p - 4", "3*p"."""
    out = ""
    for coef, var in terms:
        magnitude = abs(coef)
        body = (f"{magnitude}*{var}" if magnitude != 1 else var) if var else str(magnitude)
        if not out:
            out = ("-" if coef < 0 else "") + body
        else:
            out += (" - " if coef < 0 else " + ") + body
    return out


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    return rng.choice([k for k in range(low, high + 1) if k != 0])


def linear_1d_problem(rng: random.Random) -> dict:
    """One "Solve ... for x." problem with an integer solution, in one of three shapes."""
    v, x = rng.choice(_VARIABLES), rng.randint(-15, 15)
    shape = rng.randrange(3)
    if shape == 0:      # a*x + b = c
        a, b = _nonzero(rng, -20, 20), _nonzero(rng, -50, 50)
        left, right = _linear([(a, v), (b, "")]), str(a * x + b)
    elif shape == 1:    # a*x = c*x + d
        a, c = _nonzero(rng, -20, 20), _nonzero(rng, -20, 20)
        c = c if c != a else a + 1
        d = (a - c) * x
        left, right = _linear([(a, v)]), _linear([(c, v)] + ([(d, "")] if d else []))
    else:               # 0 = a*x + b*x + d
        a, b = _nonzero(rng, -12, 12), _nonzero(rng, -12, 12)
        b = b if a + b else b + 1
        d = -(a + b) * x
        left, right = "0", _linear([(a, v), (b, v)] + ([(d, "")] if d else []))
    return {"question": f"Solve {left} = {right} for {v}.", "answer": str(x)}


def math_dataset_rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"math_dataset:{split}:{seed}")
    return [linear_1d_problem(rng) for _ in range(n)]


def generate(generator: str, split: str, n: int, seed: int, data_dir: Path) -> list[dict]:
    """Rows of a derived dataset; the same arguments always give the same rows."""
    if split not in CORPUS_FILES:
        raise DerivedDataError(f"derived dataset {generator}: split {split!r} unknown; use train or validation")
    if generator == "fix_punct":
        return fix_punct_rows(split, n, seed, data_dir)
    if generator == "math_dataset":
        return math_dataset_rows(split, n, seed)
    raise DerivedDataError(f"unknown generator {generator!r}; known: fix_punct, math_dataset")
