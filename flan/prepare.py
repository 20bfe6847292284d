"""`flan data prepare`: bring a dataset's public data into the project's data folder, mapped and checked.

    manifest = prepare(spec, out_dir=Path("data"), from_dir=Path("/dl"), max_rows=None, bad_rows="error")

Reads with the `datasets` library, from a local copy when `from_dir` is given, else from the Hugging Face hub
named by the task's [source] table (flan/sources.py). A local copy is looked for in from_dir/<hub id>,
from_dir/<hub name>, from_dir/<task name>, then from_dir itself, holding either what `save_to_disk` wrote
(dataset_dict.json, or one folder per split) or parquet / JSON files in the hub's layout:
<config>/<split>/*.parquet, <config>/<split>-*.parquet, <split>/*.parquet, data/<split>-*.parquet (the
same with .json / .jsonl). Rows are streamed, never loaded whole. JSON Lines files are read here line by line
(not by `datasets`, which fails on a whole file for one bad line), so that a truncated or non-UTF-8 line is
named by file and line, or skipped and counted.

Every hub row is mapped onto the task's fields and checked (flan/loaders.row_problem): a bad row stops with
an error naming dataset, split and row, or with bad_rows="skip" is left out and counted. Rows the hub keeps
without a gold label ([source] unlabelled, e.g. GLUE's test rows) are left out and counted separately.

Output: out_dir/<data>/<split>.jsonl and out_dir/<data>/manifest.json (source id, revision or fingerprint of
what was read, rows / skipped / unlabelled per split, sha256 of each file). A split whose manifest entry
matches (same source, fingerprint and settings, file hash intact) is not redone, so a rerun is a no-op and an
interrupted run resumes with the splits it had not finished. A folder without our manifest is never written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm

from engine.data_files import BAD_ROWS, json_rows
from flan.loaders import DataError, row_problem
from flan.registry import TaskSpec
from flan.sources import MapError, is_unlabelled, map_row

MANIFEST = "manifest.json"
FORMAT = 1
_EXTS = ("parquet", "jsonl", "json")


def _offline_hint(spec: TaskSpec) -> str:
    cfg = spec.origin.config or "<config>"
    return (f"prepare offline: download the dataset's parquet files (hub layout {cfg}/<split>/*.parquet) or a "
            f"save_to_disk folder, then run `flan data prepare {spec.name} --from DIR`")


def _roots(spec: TaskSpec, from_dir: Path) -> list[Path]:
    """The local copy's folder: the first of from_dir/<hub id>, /<hub name>, /<task name>, from_dir that exists."""
    if not from_dir.is_dir():
        raise DataError(f"--from {from_dir}: no such folder")
    hub = spec.origin.hub
    names = [hub, hub.split("/")[-1], spec.name] if hub else [spec.name]
    return [next(p for p in [from_dir / n for n in names] + [from_dir] if p.is_dir())]


def _split_files(base: Path, split: str) -> list[Path]:
    for ext in _EXTS:
        for pattern in (f"{split}/*.{ext}", f"{split}-*.{ext}", f"{split}.{ext}", f"data/{split}-*.{ext}"):
            files = sorted(base.glob(pattern))
            if files:
                return files
    return []


def _files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _open_local(spec: TaskSpec, from_dir: Path, hub_split: str, bad_rows: str):
    """(rows iterable, column names, fingerprint, where) of one hub split of a local copy, or None."""
    import datasets

    config = spec.origin.config
    for root in _roots(spec, from_dir):
        bases = [root / config, root] if config else [root]
        for base in bases:
            if (base / "dataset_dict.json").is_file():
                dd = datasets.load_from_disk(str(base))
                if hub_split in dd:
                    ds = dd[hub_split]
                    return ds, ds.column_names, ds._fingerprint, str(base)
            if (base / hub_split / "state.json").is_file():
                ds = datasets.load_from_disk(str(base / hub_split))
                return ds, ds.column_names, ds._fingerprint, str(base / hub_split)
            files = _split_files(base, hub_split)
            if files and files[0].suffix != ".parquet" and all(_json_lines_file(f) for f in files):
                rows = JsonLines(files, bad_rows)
                return rows, list(next(iter(rows), {})), _files_fingerprint(files), str(files[0].parent)
            if files:
                builder = "parquet" if files[0].suffix == ".parquet" else "json"
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                           streaming=True)
                columns = list(ds.features) if ds.features else list(next(iter(ds), {}))
                return ds, columns, _files_fingerprint(files), str(files[0].parent)
    return None


def _json_lines_file(path: Path) -> bool:
    """Whether a .json/.jsonl file holds one object per line (the hub's JSON files do; a JSON array does not)."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return not head.startswith(b"[")


class JsonLines:
    """The rows of local JSON Lines files, read here rather than by `datasets` so that a truncated or non-UTF-8
    line is named by file and line, and with bad_rows=skip only that line is left out (recorded in `skipped`)."""

    def __init__(self, files: list[Path], bad_rows: str):
        self.files, self.bad_rows, self.skipped = files, bad_rows, []

    def __iter__(self):
        self.skipped = []
        for path in self.files:
            for _, row in json_rows(path, self.bad_rows, self.skipped):
                yield row


def _hub_rows(ds, spec: TaskSpec, split: str, where: str):
    """The rows of an opened hub split; a failure of `datasets` to read its files (a damaged parquet file, a
    malformed JSON array) becomes one error naming the dataset, split and files."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except DataError:  # a bad line of a local JSON Lines file (JsonLines), already named by file and line
            raise
        except Exception as e:  # pyarrow and datasets raise their own classes for a file they cannot read
            raise DataError(f"dataset {spec.name}, split {split}: reading {where} failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); restore the files or fetch "
                            "them again") from None
        yield row


def _local_splits(spec: TaskSpec, from_dir: Path) -> list[str]:
    """Split names a local copy seems to hold (for the unknown-split message)."""
    found = set()
    for root in _roots(spec, from_dir):
        for base in ([root / spec.origin.config, root] if spec.origin.config else [root]):
            if (base / "dataset_dict.json").is_file():
                found |= set(json.loads((base / "dataset_dict.json").read_text()).get("splits", []))
            for f in base.glob("*"):
                name = f.name.split("-")[0].split(".")[0]
                if f.is_dir() and (any(f.glob("*.parquet")) or any(f.glob("*.json*")) or (f / "state.json").exists()):
                    found.add(f.name)
                elif f.suffix in (".parquet", ".json", ".jsonl"):
                    found.add(name)
    return sorted(found)


def _open_hub(spec: TaskSpec, hub_split: str):
    import datasets

    src = spec.origin
    what = f"hub dataset {src.hub!r}" + (f" config {src.config!r}" if src.config else "") + f" split {hub_split!r}"
    try:
        ds = datasets.load_dataset(src.hub, src.config or None, split=hub_split, revision=src.revision or None,
                                   streaming=True)
        first = next(iter(ds))
    except Exception as e:  # any failure to reach or read the hub gets the same advice: prepare offline
        raise DataError(f"dataset {spec.name}: tried the Hugging Face {what} and failed "
                        f"({type(e).__name__}: {str(e)[:160]}); {_offline_hint(spec)}") from None
    columns = list(ds.features) if ds.features else list(first)
    return ds, columns, src.revision or "main", f"hf://{src.hub}" + (f"/{src.config}" if src.config else "")


def _open(spec: TaskSpec, hub_split: str, from_dir: Path | None, bad_rows: str):
    if from_dir is None:
        return _open_hub(spec, hub_split)
    opened = _open_local(spec, from_dir, hub_split, bad_rows)
    if opened is None:
        found = _local_splits(spec, from_dir)
        where = ", ".join(str(r) for r in _roots(spec, from_dir)) or str(from_dir)
        raise DataError(f"dataset {spec.name}: hub split {hub_split!r} not found under {where} (found: "
                        f"{', '.join(found) or 'no splits'}); the [source] splits of {spec.source.name} name the "
                        "hub splits, and the copy needs the hub's layout or a save_to_disk folder")
    return opened


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings_key(spec: TaskSpec, fingerprints: list[str], max_rows, bad_rows: str) -> str:
    src = spec.origin
    text = json.dumps([FORMAT, src.hub, src.config, src.revision, repr(src), fingerprints, max_rows, bad_rows,
                       spec.source.read_bytes().hex()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_split(spec: TaskSpec, split: str, opened: list, path: Path, max_rows, bad_rows: str,
                 progress: bool) -> dict:
    label_field = spec.labels.field if spec.labels else spec.choices.label_field if spec.choices else None
    rows = skipped = unlabelled = 0
    tmp = path.with_suffix(".jsonl.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out, \
                tqdm(desc=f"{spec.name} {split}", unit=" rows", disable=not progress, leave=False) as bar:
            for (ds, _, _, where), hub_split in opened:
                for i, hub_row in enumerate(_hub_rows(ds, spec, split, where)):
                    if max_rows is not None and rows >= max_rows:
                        break
                    bar.update()
                    try:
                        if is_unlabelled(spec.origin, label_field, hub_row):
                            unlabelled += 1
                            continue
                        row = map_row(spec, hub_row)
                        problem = row_problem(spec, row)
                    except MapError as e:
                        problem = str(e)
                    if problem is None:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        rows += 1
                    elif bad_rows == "skip":
                        skipped += 1
                    else:
                        raise DataError(f"dataset {spec.name}, split {split} (hub split {hub_split} in {where}), row "
                                        f"{i}: {problem}; fix the [source] table of {spec.source.name}, or set "
                                        "--data.bad_rows=skip to skip and count bad rows")
                if isinstance(ds, JsonLines):
                    skipped += len(ds.skipped)  # lines that held no row
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # a split file exists only once complete
    return {"rows": rows, "skipped": skipped, "unlabelled": unlabelled, "sha256": _sha256(path)}


def prepare(spec: TaskSpec, *, out_dir: Path, from_dir: Path | None = None, max_rows: int | None = None,
            bad_rows: str = "error", progress: bool = True) -> tuple[dict, bool]:
    """Prepare one dataset; returns (manifest, whether anything was written)."""
    src = spec.origin
    if not src.preparable:
        raise DataError(f"dataset {spec.name}: no usable hub copy ({src.no_hub})")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"--max-rows={max_rows}: give at least 1 (or leave it out for every row)")
    if bad_rows not in BAD_ROWS:
        raise DataError(f"--data.bad_rows={bad_rows!r}; use 'error' or 'skip'")
    folder = Path(out_dir) / spec.data
    manifest_path = folder / MANIFEST
    if folder.exists() and any(folder.iterdir()) and not manifest_path.is_file():
        raise DataError(f"{folder}: holds files that `flan data prepare` did not write; it never overwrites them: "
                        "choose another --out or move them away")
    opened = {split: [(_open(spec, h, Path(from_dir) if from_dir else None, bad_rows), h) for h in hubs]
              for split, hubs in src.splits.items()}
    for split, items in opened.items():
        for (_, columns, _, where), hub_split in items:
            missing = sorted(src.hub_columns - set(columns))
            if missing:
                raise DataError(f"dataset {spec.name}, split {split} (hub split {hub_split} in {where}): hub column "
                                f"{', '.join(map(repr, missing))} missing (it has {', '.join(columns)}); the "
                                f"[source.columns] of {spec.source.name} name the hub's columns")
    key = _settings_key(spec, [o[2] for items in opened.values() for o, _ in items], max_rows, bad_rows)
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    done = old.get("splits", {}) if old.get("key") == key else {}
    manifest = {"format": FORMAT, "dataset": spec.name, "key": key, "complete": False,
                "source": {"hub": src.hub, "config": src.config, "revision": src.revision or None, "tfds": src.tfds},
                "read_from": sorted({o[3] for items in opened.values() for o, _ in items}),
                "fingerprints": {split: [o[2] for o, _ in items] for split, items in opened.items()},
                "max_rows": max_rows, "bad_rows": bad_rows, "splits": {}}
    folder.mkdir(parents=True, exist_ok=True)
    wrote = False
    for split, items in opened.items():
        path = folder / f"{split}.jsonl"
        entry = done.get(split)
        if not (entry and path.is_file() and _sha256(path) == entry["sha256"]):
            entry = _write_split(spec, split, items, path, max_rows, bad_rows, progress)
            wrote = True
            manifest["splits"][split] = entry
            _write_manifest(manifest_path, manifest)  # after every split: a rerun resumes after the last one done
        manifest["splits"][split] = entry
    manifest["complete"] = True
    if wrote or old != manifest:
        _write_manifest(manifest_path, manifest)
        wrote = True
    return manifest, wrote


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
