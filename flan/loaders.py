"""Dataset rows from <data_dir>/<dataset>/{train,validation}.jsonl (or a derived generator), validated.

    split = load_split(spec, "train", data_dir=data_dirs(cfg), bad_rows="error")
    split.rows, split.skipped      # the valid rows; "file:line: reason" for every row skipped

`data_dir` is one folder or a search path: data_dirs(cfg) gives data.prepared_dir (what `flan data prepare`
wrote) before data.data_dir (the shared samples), and each dataset is read from the first folder holding it.

Every row is checked against the dataset's registry entry: each required field present with its type,
a cls label among the label values, an mc gold choice among the row's options. With bad_rows="error"
the first bad row raises DataError naming the file, the line and the fix; with bad_rows="skip" bad rows
are left out and listed in `skipped` (callers report the count): nothing is dropped silently.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.data_files import BAD_ROWS, DataError, bad_row, json_line, report_skipped
from engine.paths import MissingDataError, shared_data_dir
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


def data_dirs(cfg, *, required: bool = True) -> tuple[Path, ...]:
    """The dataset search path of a config: data.prepared_dir (when it exists), then data.data_dir."""
    dirs = [Path(cfg.data.prepared_dir)] if cfg.data.prepared_dir and Path(cfg.data.prepared_dir).is_dir() else []
    try:
        dirs.append(shared_data_dir(cfg.data.data_dir or None))
    except MissingDataError:
        if required and not dirs:
            raise
    return tuple(dirs)


def _dirs(data_dir) -> tuple[Path, ...]:
    return (Path(data_dir),) if isinstance(data_dir, (str, Path)) else tuple(Path(d) for d in data_dir)


def corpus_dir(data_dir) -> Path:
    """The folder of the search path that holds the text corpus (derived datasets read it)."""
    dirs = _dirs(data_dir)
    return next((d for d in dirs if (d / "corpus").is_dir()), dirs[-1])


def split_path(spec: TaskSpec, split: str, data_dir) -> Path | None:
    """The JSONL file of a split, or None if derived. A dataset is read from the first folder of the search path
    that holds its folder, never split across two (a prepared copy's splits must not meet the samples')."""
    if spec.derived:
        return None
    folders = [d / spec.data for d in _dirs(data_dir)] or [Path(spec.data)]
    return next((f for f in folders if f.is_dir()), folders[-1]) / f"{split}.jsonl"


def has_split(spec: TaskSpec, split: str, data_dir) -> bool:
    if spec.derived:
        return split in spec.derived.sizes
    return split_path(spec, split, data_dir).is_file()


def count_examples(spec: TaskSpec, split: str, data_dir) -> int:
    """Rows in a split without parsing them (0 when the split has no data)."""
    if spec.derived:
        return spec.derived.sizes.get(split, 0)
    path = split_path(spec, split, data_dir)
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def parse_line(spec: TaskSpec, line: bytes) -> tuple[dict | None, str | None]:
    """(row, None) for a valid JSONL line, (None, why) otherwise; why is "blank" for an empty line."""
    row, problem = json_line(line)
    if problem is None:
        problem = row_problem(spec, row)
    return (row, None) if problem is None else (None, problem)


def _checked(spec: TaskSpec, split: str, path: Path, n_rows: int, skipped: list[str]) -> None:
    """Report what reading a split left out: skipped rows (one warning) and an empty split. An empty train
    split leaves the dataset out of the mixture with a warning; an empty split scored or shown is an error."""
    report_skipped(f"dataset {spec.name} {split}", skipped)
    if n_rows:
        return
    why = f"all {len(skipped)} rows were malformed and skipped" if skipped else "the file holds no rows"
    if split == "train":
        warnings.warn(f"{path}: dataset {spec.name} has an empty train split ({why}); it is left out",
                      stacklevel=3)
        return
    raise DataError(f"{path}: dataset {spec.name} has an empty {split} split ({why}); restore the file, "
                    f"or remove it so that {spec.name} counts as having no {split} data")


def _read_jsonl(spec: TaskSpec, path: Path, bad_rows: str) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    with path.open("rb") as f:  # bytes: a non-UTF-8 line is reported with its line, not as a decode crash
        for lineno, line in enumerate(f, 1):
            row, problem = parse_line(spec, line)
            if row is not None:
                rows.append(row)
            elif problem != "blank":
                bad_row(path, lineno, problem, bad_rows, skipped)
    return rows, skipped


@lru_cache(maxsize=256)
def _load(spec: TaskSpec, split: str, data_dir: tuple[str, ...], bad_rows: str, seed: int) -> Split:
    if spec.derived:
        n = spec.derived.sizes[split]
        return Split(spec, split, generate(spec.derived.generator, split, n, seed, corpus_dir(data_dir)),
                     f"derived:{spec.derived.generator}")
    path = split_path(spec, split, data_dir)
    rows, skipped = _read_jsonl(spec, path, bad_rows)
    _checked(spec, split, path, len(rows), skipped)
    return Split(spec, split, rows, str(path), skipped)


def _check_args(spec: TaskSpec, split: str, data_dir, bad_rows: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} unknown; use one of {', '.join(SPLITS)}")
    if bad_rows not in BAD_ROWS:
        raise DataError(f"bad_rows={bad_rows!r}; use 'error' or 'skip'")
    if not has_split(spec, split, data_dir):
        where = split_path(spec, split, data_dir) or f"[derived] of {spec.source}"
        raise DataError(f"{where}: dataset {spec.name} has no {split} split here; "
                        f"`flan data tasks` lists which datasets have local data")


def load_split(spec: TaskSpec, split: str, *, data_dir, bad_rows: str = "error",
               seed: int = 0) -> Split:
    """Validated rows of one split (read once per process); `seed` only matters for derived datasets."""
    _check_args(spec, split, data_dir, bad_rows)
    return _load(spec, split, tuple(str(d) for d in _dirs(data_dir)), bad_rows, seed)


_BLOCK = 1 << 24  # bytes scanned at a time when indexing a file


def _line_starts(path: Path) -> np.ndarray:
    """Byte offset of every line start of a file (a last line without a newline included), read in blocks."""
    starts, pos = [np.zeros(1, dtype=np.int64)], 0
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            starts.append(np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(block)
    out = np.concatenate(starts)
    return out[:-1] if len(out) > 1 and out[-1] == pos else out  # no empty "line" after a final newline


def _prepared_rows(path: Path) -> int | None:
    """The row count a complete `flan data prepare` manifest vouches for (every row checked then), or None."""
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        return int(m["splits"][path.stem]["rows"]) if m.get("complete") else None
    except (ValueError, KeyError, TypeError):
        return None


class RowIndex:
    """A split's rows read on demand by byte offset: the file is never held in memory, only 8 bytes per row.

    Built in one pass that checks every row (as load_split does: error or skip and count); a file that
    `flan data prepare` wrote and vouches for in its manifest is only scanned for line starts.
    """

    def __init__(self, spec: TaskSpec, path: Path, bad_rows: str):
        self.spec, self.path, self.skipped = spec, path, []
        starts = _line_starts(path)
        if _prepared_rows(path) == len(starts):
            self.offsets = starts
        else:
            keep = np.zeros(len(starts), dtype=bool)
            with path.open("rb") as f:
                for lineno, line in enumerate(f, 1):
                    row, problem = parse_line(spec, line)
                    keep[lineno - 1] = row is not None
                    if row is None and problem != "blank":
                        bad_row(path, lineno, problem, bad_rows, self.skipped)
            self.offsets = starts[keep]
        self._file = path.open("rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        self._file.seek(int(self.offsets[i]))
        row, problem = parse_line(self.spec, self._file.readline())
        if row is None:  # a prepared file is checked here, row by row, as it is read
            raise DataError(f"{self.path}:{i + 1}: {problem}; fix the row (the manifest beside it vouched for "
                            "every row), or prepare the dataset again")
        return row


def open_split(spec: TaskSpec, split: str, *, data_dir, bad_rows: str = "error", seed: int = 0):
    """The rows of one split without loading the file: a RowIndex (derived datasets: their generated list).
    Returns (rows, skipped) with the same rows, in the same order, as load_split."""
    if spec.derived:
        loaded = load_split(spec, split, data_dir=data_dir, bad_rows=bad_rows, seed=seed)
        return loaded.rows, loaded.skipped
    _check_args(spec, split, data_dir, bad_rows)
    index = RowIndex(spec, split_path(spec, split, data_dir), bad_rows)
    _checked(spec, split, index.path, len(index), index.skipped)
    return index, index.skipped
