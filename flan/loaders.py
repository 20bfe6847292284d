"""Dataset rows from <data_dir>/<dataset>/{train,validation}.jsonl (or a derived generator), validated.

    split = load_split(spec, "train", data_dir=shared_data_dir(), bad_rows="error")
    split.rows, split.skipped      # the valid rows; "file:line: reason" for every row skipped

Every row is checked against the dataset's registry entry: each required field present with its type,
a cls label among the label values, an mc gold choice among the row's options. With bad_rows="error"
the first bad row raises DataError naming the file, the line and the fix; with bad_rows="skip" bad rows
are left out and listed in `skipped` (callers report the count): nothing is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.errors import FlanError
from flan.derived import generate
from flan.registry import TaskSpec
from flan.templates import label_index, options_of

SPLITS = ("train", "validation", "test")
_TYPE_CHECKS = {
    "text": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "numbered": lambda v: isinstance(v, list),
    "triples": lambda v: isinstance(v, list) and all(isinstance(t, list) for t in v),
}


class DataError(FlanError, ValueError):
    """A dataset file is missing or holds a malformed row."""


@dataclass
class Split:
    task: TaskSpec
    split: str
    rows: list[dict]
    source: str                                         # the file read, or "derived:<generator>"
    skipped: list[str] = field(default_factory=list)    # "file:line: reason" per skipped row


def row_problem(spec: TaskSpec, row) -> str | None:
    """Why `row` does not fit the registry entry of `spec`, or None when it does."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    for name, f in spec.fields.items():
        value = row.get(name)
        if value is None:
            if not f.optional:
                return f"missing field {name!r} (required by {spec.source.name})"
        elif not _TYPE_CHECKS[f.type](value):
            return f"field {name!r} should be {f.type}, got {type(value).__name__} {value!r:.40}"
    if spec.kind == "cls":
        raw = row[spec.labels.field]
        try:
            label_index(spec, row)
        except (ValueError, TypeError):
            return (f"label {raw!r} in field {spec.labels.field!r} is not one of "
                    f"{', '.join(spec.labels.values)}")
    elif spec.kind == "mc":
        options = options_of(spec, row)
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            return f"needs at least two string options, got {options!r:.80}"
        try:
            label_index(spec, row)
        except (ValueError, TypeError, IndexError):
            gold = spec.choices.label_field or spec.choices.answer_field
            return f"gold choice {row[gold]!r:.60} (field {gold!r}) is not among the {len(options)} options"
    return None


def split_path(spec: TaskSpec, split: str, data_dir: Path) -> Path | None:
    """The JSONL file of a split, or None for derived datasets."""
    return None if spec.derived else Path(data_dir) / spec.data / f"{split}.jsonl"


def has_split(spec: TaskSpec, split: str, data_dir: Path) -> bool:
    if spec.derived:
        return split in spec.derived.sizes
    return split_path(spec, split, data_dir).is_file()


def count_examples(spec: TaskSpec, split: str, data_dir: Path) -> int:
    """Rows in a split without parsing them (0 when the split has no data)."""
    if spec.derived:
        return spec.derived.sizes.get(split, 0)
    path = split_path(spec, split, data_dir)
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _read_jsonl(spec: TaskSpec, path: Path, bad_rows: str) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = row_problem(spec, row)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                rows.append(row)
            elif bad_rows == "skip":
                skipped.append(f"{path}:{lineno}: {problem}")
            else:
                raise DataError(f"{path}:{lineno}: {problem}; fix the row, or set --data.bad_rows=skip "
                                "to skip and count bad rows")
    return rows, skipped


@lru_cache(maxsize=256)
def _load(spec: TaskSpec, split: str, data_dir: str, bad_rows: str, seed: int) -> Split:
    if spec.derived:
        n = spec.derived.sizes[split]
        return Split(spec, split, generate(spec.derived.generator, split, n, seed, Path(data_dir)),
                     f"derived:{spec.derived.generator}")
    path = split_path(spec, split, Path(data_dir))
    rows, skipped = _read_jsonl(spec, path, bad_rows)
    return Split(spec, split, rows, str(path), skipped)


def load_split(spec: TaskSpec, split: str, *, data_dir: str | Path, bad_rows: str = "error",
               seed: int = 0) -> Split:
    """Validated rows of one split (read once per process); `seed` only matters for derived datasets."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} unknown; use one of {', '.join(SPLITS)}")
    if bad_rows not in ("error", "skip"):
        raise DataError(f"bad_rows={bad_rows!r}; use 'error' or 'skip'")
    if not has_split(spec, split, Path(data_dir)):
        where = split_path(spec, split, Path(data_dir)) or f"[derived] of {spec.source}"
        raise DataError(f"{where}: dataset {spec.name} has no {split} split here; "
                        f"`flan data tasks` lists which datasets have local data")
    return _load(spec, split, str(data_dir), bad_rows, seed)
