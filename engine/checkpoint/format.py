"""The checkpoint format: the folder layout, one rank's part of the index (`Share`), merging the parts into
index.json, reading the index back, and the RNG states every rank records.

    <run_dir>/checkpoints/step-000100/
        model-r00003.safetensors   rank 3's regions of the weights (its tp slices of its stage's layers)
        optim-r00003.safetensors   its regions of the optimizer state (its ZeRO-1 slice under zero=1)
        rng-r00003.safetensors     its torch (CPU and CUDA) RNG states
        rank-r00003.json           its part of the index (numpy/python RNG states included)
        index.json                 config, layout, step, data position, and for every global tensor its
                                   shape, dtype and pieces: (file, key, box = (start, stop) per dimension, crc32)
        COMPLETE                   written last: a folder without it is never loaded
"""
from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import FlanError
from engine.parallel.boxes import Box

FORMAT = "flan-engine sharded checkpoint 1"
COMPLETE = "COMPLETE"
INDEX = "index.json"


class CheckpointError(FlanError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the tensor and what is wrong."""


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
          "uint8": torch.uint8, "bool": torch.bool}
"""The dtype names index.json may hold (what the engine saves); any other name is refused, never looked up."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- what one rank writes -----------------------------------------------------------------------------------
def crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor safetensors accepts: the tensor itself, or a copy when it is a view into a larger buffer
    (ZeRO slices), since safetensors refuses tensors that share memory."""
    t = t.detach()
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    if not whole or not t.is_contiguous():
        return t.to("cpu", copy=True).contiguous()
    return t.cpu()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Share:
    """One rank's files (name -> {key: tensor}) and its part of the index.

    With `staging` (async saves) every tensor is copied into a CPU buffer kept in that dict and reused by the
    next save, so that training may change the originals while a thread writes; allocating fresh memory for
    each snapshot costs more than the copy itself."""

    def __init__(self, rank: int, staging: dict[str, torch.Tensor] | None = None):
        self.rank, self.staging = rank, staging
        self.files: dict[str, dict[str, torch.Tensor]] = {}
        self.tensors: dict[str, dict] = {}
        self.bound: dict[str, dict] = {}

    def _stage(self, file: str, key: str, t: torch.Tensor) -> None:
        if self.staging is None:
            data = _owned(t)
        else:
            data = self.staging.get(key)
            if data is None or data.shape != t.shape or data.dtype != t.dtype:
                data = self.staging[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            data.copy_(t.detach())
        self.files.setdefault(file, {})[key] = data

    def add(self, kind: str, global_name: str, global_shape, box: Box, tensor: torch.Tensor) -> None:
        """A region (`box`) of a global tensor, resharded freely on load."""
        file = f"{kind}-r{self.rank:05d}.safetensors"
        entry = self.tensors.setdefault(global_name, {"shape": list(global_shape), "dtype": _dtype_name(tensor),
                                                      "kind": kind, "pieces": []})
        key = f"{global_name}#{len(entry['pieces'])}"
        self._stage(file, key, tensor)
        entry["pieces"].append({"file": file, "key": key, "box": [list(b) for b in box]})

    def add_bound(self, state_name: str, box: Box, tensor: torch.Tensor) -> None:
        """Optimizer state that only the parameter slice `box` it was computed over can use (Adafactor's factors)."""
        file = f"optim-r{self.rank:05d}.safetensors"
        key = f"{state_name}@{self.rank}"
        self._stage(file, key, tensor)
        entry = self.bound.setdefault(state_name, {"shape": list(tensor.shape), "pieces": []})
        entry["pieces"].append({"file": file, "key": key, "box": [list(b) for b in box]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---- the index ----------------------------------------------------------------------------------------------
def merge_fragments(tmp: Path, fragments: list[dict]) -> tuple[dict, dict, dict, dict]:
    """Merge the ranks' index parts and check that the files are all there and every tensor is covered once."""
    tensors: dict[str, dict] = {}
    bound: dict[str, dict] = {}
    scalars: dict[str, float] = {}
    files: dict[str, int] = {}
    for frag in fragments:
        files.update(frag["files"])
        scalars.update(frag["scalars"])
        for name, entry in frag["tensors"].items():
            merged = tensors.setdefault(name, dict(entry, pieces=[]))
            if merged["shape"] != entry["shape"] or merged["dtype"] != entry["dtype"]:
                raise CheckpointError(f"{tmp}: ranks disagree on tensor {name!r}: {merged['shape']} "
                                      f"{merged['dtype']} vs {entry['shape']} {entry['dtype']} (rank {frag['rank']})")
            merged["pieces"] += entry["pieces"]
        for name, entry in frag["bound"].items():
            bound.setdefault(name, dict(entry, pieces=[]))["pieces"] += entry["pieces"]
    for name, size in files.items():
        path = tmp / name
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"{path}: missing or not {size} bytes at commit; the checkpoint is not complete")
    for name, entry in tensors.items():
        covered = sum(math.prod(b - a for a, b in piece["box"]) for piece in entry["pieces"])
        if covered != math.prod(entry["shape"]):
            raise CheckpointError(f"{tmp}: tensor {name!r} of shape {entry['shape']} has {covered} elements in its "
                                  f"pieces, not {math.prod(entry['shape'])}: a layout's writer rule is wrong")
    return tensors, bound, scalars, files


def dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings): one global tensor, one name."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def confined(folder: Path, name: Any, where: str) -> Path:
    """`folder / name` for a file name read from `where` (index.json): a plain name inside the folder, not a
    path (no separators, no .., not absolute) and not a symlink that leads out of it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or Path(name).is_absolute():
        raise CheckpointError(f"{where}: file name {name!r} is not a plain file name inside {folder}; the index is "
                              "damaged or was not written by this engine")
    path = folder / name
    if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
        raise CheckpointError(f"{path}: a symlink leading out of the checkpoint folder (to {path.resolve()}); "
                              "refused: every file of a checkpoint lives in its folder")
    return path


def _check_pieces(path: Path, where: str, name: str, entry: Any, files: dict, ndim: int | None) -> None:
    pieces = entry.get("pieces") if isinstance(entry, dict) else None
    if not isinstance(pieces, list):
        raise CheckpointError(f"{where}: tensor {name!r} has no list of pieces; the index is damaged")
    for piece in pieces:
        ok = isinstance(piece, dict) and isinstance(piece.get("key"), str) and isinstance(piece.get("crc32"), int)
        box = piece.get("box") if ok else None
        ok = ok and isinstance(box, list) and all(
            isinstance(b, list) and len(b) == 2 and all(type(x) is int for x in b) and 0 <= b[0] <= b[1] for b in box)
        if not ok or (ndim is not None and len(box) != ndim):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed piece {str(piece)[:120]} (needs file, "
                                  "key, box, crc32); the index is damaged")
        confined(path, piece.get("file"), where)
        if piece["file"] not in files:
            raise CheckpointError(f"{where}: tensor {name!r} names file {piece['file']!r}, which the index's file "
                                  "list does not hold; the index is damaged")


def check_index(path: Path, index: Any) -> dict[str, Any]:
    """The index's structure, before anything is read through it: every file name confined to the folder,
    every dtype from the allow-list, every piece with its box and checksum."""
    where = str(path / INDEX)
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: not a JSON object; the checkpoint is damaged, use an older one")
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format {index.get('format')!r} is not {FORMAT!r}; this engine cannot "
                              "read it")
    missing = [k for k in ("step", "config", "layout", "world_size", "files", "tensors", "ranks") if k not in index]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}; the checkpoint is damaged, use an older one")
    files = index["files"]
    if not isinstance(files, dict) or not all(type(v) is int for v in files.values()):
        raise CheckpointError(f"{where}: the file list is malformed; the checkpoint is damaged, use an older one")
    for name in files:
        confined(path, name, where)
    tensors = index["tensors"]
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{where}: the tensor table is malformed; the checkpoint is damaged")
    for name, entry in tensors.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has a malformed shape; the index is damaged")
        if entry.get("dtype") not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has dtype {entry.get('dtype')!r}; accepted: "
                                  f"{', '.join(DTYPES)}")
        _check_pieces(path, where, name, entry, files, len(shape))
    for name, entry in index.get("bound_state", {}).items():
        _check_pieces(path, where, name, entry, files, None)
    for record in index["ranks"]:
        if not isinstance(record, dict) or type(record.get("rank")) is not int or "rng" not in record:
            raise CheckpointError(f"{where}: a rank record is malformed ({str(record)[:80]}); the index is damaged")
    return index


def rng_file(rank: int) -> str:
    return f"rng-r{rank:05d}.safetensors"


def load_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's index (config, layout, step, data position, tensors); refuses unfinished ones."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; give a step-NNNNNN folder (e.g. "
                              "runs/tiny/checkpoints/step-000300) or a run folder that holds one")
    if not (path / COMPLETE).is_file():
        if (path / "checkpoints").is_dir() or not (path / INDEX).is_file() and not any(path.glob("*.safetensors")):
            newest = latest_checkpoint(path)
            hint = f"its newest complete checkpoint is {newest}" if newest else "it holds no complete checkpoint"
            raise CheckpointError(f"{path}: not a checkpoint folder (no {INDEX}); {hint}")
        raise CheckpointError(f"{path}: no {COMPLETE} marker, so this checkpoint was never finished; use an older one")
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / INDEX}: unreadable ({e}); the checkpoint is damaged, use an older one") from None
    return check_index(path, index)
