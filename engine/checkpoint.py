"""Sharded checkpoints: every rank writes what it owns as safetensors, one JSON index names every global tensor
and the region each file holds; a checkpoint loads into any layout; no pickle anywhere.

    <run_dir>/checkpoints/step-000100/
        model-r00003.safetensors   rank 3's regions of the weights (its tp slices of its stage's layers)
        optim-r00003.safetensors   its regions of the optimizer state (its ZeRO-1 slice under zero=1)
        rng-r00003.safetensors     its torch (CPU and CUDA) RNG states
        rank-r00003.json           its part of the index (numpy/python RNG states included)
        index.json                 config, layout, step, data position, and for every global tensor its
                                   shape, dtype and pieces: (file, key, box = (start, stop) per dimension, crc32)
        COMPLETE                   written last: a folder without it is never loaded

Saving (`Checkpointer.save`, every rank): write into `.tmp-step-000100-<session>`, each rank's rank-*.json
last (by rename); a barrier; rank 0 checks that every rank's part is there, every listed file at its recorded
size and every tensor covered exactly, writes index.json and COMPLETE, renames the folder into place, and only
then deletes checkpoints beyond the newest `keep`. With async_save the tensors are copied into CPU staging
buffers and a background thread does the rest while training continues; its barrier is the rank-*.json files
(no collective leaves the main thread); the next save and `wait()` (end of training) join it. A rank killed mid-save leaves a .tmp folder that is never loaded and is
removed by the next session's first commit.

Loading (`load_checkpoint`, every rank, no collectives): each rank reads only the regions its own tensors
need, through safetensors' lazy slices. Optimizer state reshards too: elementwise state (AdamW's moments)
by region, step counts from the index, and layout-bound state (Adafactor's factored moments, which depend on
the slice they were computed over) only into the same slice. A missing, truncated or corrupted file, or a
shape that does not fit the config, raises CheckpointError naming the file and the tensor.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.parallel.mesh import Mesh
from engine.parallel.specs import (Box, box_shape, flat_range_boxes, intersect, is_zero_optimizer, optimizer_pieces,
                                   parameter_specs)

FORMAT = "flan-engine sharded checkpoint 1"
COMPLETE = "COMPLETE"
INDEX = "index.json"
RENDEZVOUS_TIMEOUT_S = 1800.0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the tensor and what is wrong."""


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
def _crc(t: torch.Tensor) -> int:
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


def _rank_share(model: torch.nn.Module, optimizer, mesh: Mesh, staging: dict | None) -> tuple[Share, dict]:
    """This rank's tensors to write, and the JSON part (optimizer scalars, RNG)."""
    share = Share(mesh.rank, staging)
    specs = parameter_specs(model, mesh)
    for name, p in model.named_parameters():
        spec = specs[name]
        if spec.writes:
            share.add("model", spec.global_name, spec.global_shape, spec.box, p)
    scalars: dict[str, float] = {}
    if optimizer is not None:
        pieces, scalars, bound = optimizer_pieces(optimizer, model, mesh)
        for piece in pieces:
            share.add("optim", piece.global_name, piece.global_shape, piece.box, piece.tensor)
        for piece in bound:
            share.add_bound(piece.global_name, piece.box, piece.tensor)
    rng_tensors, rng_json = _rng_state()
    share.files[f"rng-r{mesh.rank:05d}.safetensors"] = rng_tensors
    return share, {"scalars": scalars, "rng": rng_json}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    random.setstate((p[0], tuple(p[1]), p[2]))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_share(tmp: Path, share: Share, extra: dict, coords: list[int]) -> dict:
    """Write this rank's files, then (last, by rename) its rank-*.json: the rendezvous mark rank 0 waits for."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    checksums = {key: _crc(t) for tensors in share.files.values() for key, t in tensors.items()}
    for name, tensors in share.files.items():
        save_file(tensors, str(tmp / name))
        _fsync(tmp / name)
        files[name] = (tmp / name).stat().st_size
    for entry in list(share.tensors.values()) + list(share.bound.values()):
        for piece in entry["pieces"]:
            piece["crc32"] = checksums[piece["key"]]
    fragment = {"rank": share.rank, "coords": coords, "files": files, "tensors": share.tensors,
                "bound": share.bound, **extra}
    part = tmp / f".rank-r{share.rank:05d}.json.part"
    part.write_text(json.dumps(fragment))
    _fsync(part)
    part.rename(tmp / f"rank-r{share.rank:05d}.json")
    return fragment


# ---- committing (rank 0) ------------------------------------------------------------------------------------
def _wait_for_fragments(tmp: Path, world_size: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        present = [tmp / f"rank-r{r:05d}.json" for r in range(world_size)]
        missing = [p.name for p in present if not p.is_file()]
        if not missing:
            return [json.loads(p.read_text()) for p in present]
        if time.monotonic() > deadline:
            raise CheckpointError(f"{tmp}: ranks never finished their part ({', '.join(missing[:4])} missing after "
                                  f"{timeout:.0f}s); the checkpoint stays incomplete and is never loaded")
        time.sleep(0.05)


def _merge(tmp: Path, fragments: list[dict]) -> tuple[dict, dict, dict, dict]:
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


def commit(tmp: Path, final: Path, fragments: list[dict], meta: dict, keep: int) -> None:
    tensors, bound, scalars, files = _merge(tmp, fragments)
    index = dict(meta, format=FORMAT, files=files, tensors=tensors, bound_state=bound, scalars=scalars,
                 ranks=[{"rank": f["rank"], "coords": f["coords"], "rng": f["rng"]} for f in fragments])
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    _fsync(tmp / INDEX)
    (tmp / COMPLETE).write_text("ok\n")
    _fsync(tmp / COMPLETE)
    if final.exists():  # re-saving a step (after a resume): the new copy is complete, replace the old whole
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    if keep > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """Saves sharded checkpoints of one run, synchronously or in a background thread (async_save).

        saver = Checkpointer(run_dir, mesh, keep=2, async_save=True)   # collective: agrees a session id
        saver.save(step, model, optimizer, meta)                        # every rank, same steps
        saver.wait()                                                    # before exit
    """

    def __init__(self, run_dir: str | Path, mesh: Mesh, keep: int, async_save: bool = False,
                 timeout: float = RENDEZVOUS_TIMEOUT_S):
        self.root = checkpoint_dir(run_dir)
        self.mesh, self.keep, self.async_save, self.timeout = mesh, keep, async_save, timeout
        session = torch.tensor([time.time_ns() % 2 ** 62 + os.getpid()], dtype=torch.int64, device=mesh.device)
        if mesh.world_size > 1:
            dist.broadcast(session, src=0)  # one temporary folder name for every rank of this save
        self.session = f"{int(session):x}"
        self._staging: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, model: torch.nn.Module, optimizer, meta: dict[str, Any]) -> Path:
        """Write step-<step> (meta: config, data position, ... as JSON); returns its final path."""
        self.wait()
        share, extra = _rank_share(model, optimizer, self.mesh, self._staging if self.async_save else None)
        kind = None if optimizer is None else "zero1" if is_zero_optimizer(optimizer) else "torch"
        meta = json.loads(json.dumps(meta))  # a snapshot: the data stream moves on while an async save runs
        return self._save_share(step, share, extra, dict(meta, optimizer_kind=kind))

    def _save_share(self, step: int, share: Share, extra: dict, meta: dict[str, Any]) -> Path:
        mesh = self.mesh
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}-{self.session}"
        coords = [mesh.dp_rank, mesh.pp_rank, mesh.tp_rank]
        meta = dict(meta, step=step, world_size=mesh.world_size, layout={"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp})
        if not self.async_save:
            write_share(tmp, share, extra, coords)
            if mesh.world_size > 1:
                dist.barrier()
            if mesh.rank == 0:
                self._commit_and_clean(tmp, final, meta)
            if mesh.world_size > 1:
                dist.barrier()  # nobody goes on (or loads) before the checkpoint is in place
            return final

        def work():
            try:
                write_share(tmp, share, extra, coords)
                if mesh.rank == 0:
                    self._commit_and_clean(tmp, final, meta)
            except BaseException as e:  # surfaced by the next save or wait()
                self._error = e

        self._thread = threading.Thread(target=work, name=f"checkpoint-step-{step}", daemon=False)
        self._thread.start()
        return final

    def _commit_and_clean(self, tmp: Path, final: Path, meta: dict) -> None:
        fragments = _wait_for_fragments(tmp, self.mesh.world_size, self.timeout)
        commit(tmp, final, fragments, meta, self.keep)
        for stale in self.root.glob(".tmp-step-*"):  # left by killed sessions: never loadable, now removable
            if not stale.name.endswith(self.session):
                shutil.rmtree(stale, ignore_errors=True)

    def wait(self) -> None:
        """Join the background save, if any, and raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings): one global tensor, one name."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def save_weights(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                 keep: int) -> Path:
    """A single-device state dict (weights only) as a one-rank checkpoint: what importers write. Training
    state goes through Checkpointer.save, which knows the layout."""
    share = Share(0)
    for name, t in dedup_tied(model_state).items():
        share.add("model", name, tuple(t.shape), tuple((0, n) for n in t.shape), t)
    rng_tensors, rng_json = _rng_state()
    share.files["rng-r00000.safetensors"] = rng_tensors
    return Checkpointer(run_dir, Mesh(), keep)._save_share(step, share, {"scalars": {}, "rng": rng_json},
                                                           dict(meta, optimizer_kind=None))


# ---- reading ------------------------------------------------------------------------------------------------
def load_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's index (config, layout, step, data position, tensors); refuses unfinished ones."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: no {COMPLETE} marker, so this checkpoint was never finished; use an older one")
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / INDEX}: unreadable ({e}); the checkpoint is damaged, use an older one") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path / INDEX}: format {index.get('format')!r} is not {FORMAT!r}; this engine cannot "
                              "read it")
    return index


class Reader:
    """Lazily opened safetensors files of one checkpoint; regions of global tensors assembled from pieces."""

    def __init__(self, path: Path, index: dict):
        self.path, self.index = path, index
        self.handles: dict[str, Any] = {}

    def _open(self, file: str, tensor: str):
        if file in self.handles:
            return self.handles[file]
        path = self.path / file
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; index.json lists it for tensor {tensor!r} (the checkpoint was "
                                  "damaged after it was written); resume from an older checkpoint")
        size, expected = path.stat().st_size, self.index["files"].get(file)
        if expected is not None and size != expected:
            raise CheckpointError(f"{path}: {size} bytes but {expected} were written, so the file is truncated or "
                                  f"corrupted (reading tensor {tensor!r}); resume from an older checkpoint")
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}), reading tensor {tensor!r}; the file "
                                  "is truncated or corrupted, resume from an older checkpoint") from None
        self.handles[file] = handle
        return handle

    def read_piece(self, piece: dict, name: str, region: Box | None = None) -> torch.Tensor:
        """A piece's values (the part inside `region`, in global coordinates, when given)."""
        handle = self._open(piece["file"], name)
        origin = [a for a, _ in piece["box"]]
        where = f"{self.path / piece['file']}"
        try:
            lazy = handle.get_slice(piece["key"])
            if region is None or [list(b) for b in region] == piece["box"]:
                data = handle.get_tensor(piece["key"])
                if "crc32" in piece and _crc(data) != piece["crc32"]:
                    raise CheckpointError(f"{where}: tensor {name!r} (key {piece['key']!r}) fails its checksum: the "
                                          "file is corrupted; resume from an older checkpoint")
                return data
            return lazy[tuple(slice(a - o, b - o) for (a, b), o in zip(region, origin))]
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read tensor {name!r} (key {piece['key']!r}): {e}; the file is "
                                  "truncated or corrupted, resume from an older checkpoint") from None

    def entry(self, name: str, expected_shape: tuple[int, ...] | None) -> dict:
        entry = self.index["tensors"].get(name)
        if entry is None:
            raise CheckpointError(f"{self.path / INDEX}: no tensor {name!r}; the checkpoint is from another model "
                                  "or was saved without it")
        if expected_shape is not None and tuple(entry["shape"]) != tuple(expected_shape):
            first = entry["pieces"][0]["file"] if entry["pieces"] else INDEX
            raise CheckpointError(f"{self.path / first}: tensor {name!r} has global shape {tuple(entry['shape'])} "
                                  f"but the configured model needs {tuple(expected_shape)}; load it with the config "
                                  "it was saved with (index.json holds it)")
        return entry

    def region(self, name: str, box: Box, expected_shape: tuple[int, ...] | None) -> torch.Tensor:
        """The `box` region of global tensor `name`, read from the pieces that overlap it."""
        entry = self.entry(name, expected_shape)
        out = torch.empty(box_shape(box), dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for piece in entry["pieces"]:
            overlap = intersect(tuple(tuple(b) for b in piece["box"]), box)
            if overlap is None:
                continue
            data = self.read_piece(piece, name, overlap)
            out[tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(overlap, box))] = data
            covered += math.prod(box_shape(overlap))
        if covered != math.prod(box_shape(box)):
            raise CheckpointError(f"{self.path / INDEX}: the pieces of {name!r} cover {covered} of the "
                                  f"{math.prod(box_shape(box))} elements this rank needs; the index is damaged")
        return out

    def full(self, name: str) -> torch.Tensor:
        entry = self.entry(name, None)
        return self.region(name, tuple((0, n) for n in entry["shape"]), None)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight as a whole single-device tensor (for one-device consumers: init_from, scoring, tests)."""
    path = Path(path)
    reader = Reader(path, load_meta(path))
    return {name: reader.full(name) for name, e in reader.index["tensors"].items() if e["kind"] == "model"}


def apply_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a single-device state into a single-device `model`, checking names and shapes."""
    own = dict(model.named_parameters())
    for name, tensor in own.items():
        if name not in state:
            raise CheckpointError(f"{where}: tensor {name!r} is missing; the checkpoint is from another model")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)} but the "
                                  f"configured model needs {tuple(tensor.shape)}; load it with the config it "
                                  "was saved with")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(f"{where}: tensors {extra[:5]} do not exist in the configured model")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])


def _expected_names(model: torch.nn.Module) -> set[str]:
    """The global parameter names of the whole single-device model this (possibly partial) model belongs to."""
    from engine.info import meta_model
    from engine.config import Config

    cfg = Config()
    cfg.model = model.cfg
    return {name for name, _ in meta_model(cfg).named_parameters()}


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, mesh: Mesh | None = None) -> dict[str, Any]:
    """Restore this rank's weights, optimizer state and RNG from a checkpoint of any layout; return the index
    (step, data position, config, layout)."""
    path = Path(path)
    mesh = mesh or Mesh()
    index = load_meta(path)
    reader = Reader(path, index)
    saved = {n for n, e in index["tensors"].items() if e["kind"] == "model"}
    expected = _expected_names(model)
    if saved != expected:
        raise CheckpointError(f"{path / INDEX}: the checkpoint's weights do not match the configured model: missing "
                              f"{sorted(expected - saved)[:4]}, unexpected {sorted(saved - expected)[:4]}; load it "
                              "with the config it was saved with (index.json holds it)")
    specs = parameter_specs(model, mesh)
    with torch.no_grad():
        for (name, p), spec in zip(model.named_parameters(), specs.values()):
            p.copy_(reader.region(spec.global_name, spec.box, spec.global_shape))
    if optimizer is not None:
        if index.get("optimizer_kind") is None:
            raise CheckpointError(f"{path}: holds no optimizer state, so training cannot resume from it")
        _restore_optimizer(reader, optimizer, model, mesh, specs)
    _restore_rng(reader, index, mesh)
    return index


def _state_keys(index: dict, global_name: str) -> tuple[list[str], list[str], list[str]]:
    prefix = global_name + "/"
    strip = len(prefix)
    elementwise = [n[strip:] for n, e in index["tensors"].items() if e["kind"] == "optim" and n.startswith(prefix)]
    bound = [n[strip:] for n in index["bound_state"] if n.startswith(prefix)]
    scalars = [n[strip:] for n in index["scalars"] if n.startswith(prefix)]
    return elementwise, bound, scalars


def _optimizer_name(optimizer) -> str | None:
    inner = optimizer.inner if is_zero_optimizer(optimizer) else optimizer
    return {torch.optim.AdamW: "adamw", torch.optim.Adafactor: "adafactor"}.get(type(inner))


def _restore_optimizer(reader: Reader, optimizer, model: torch.nn.Module, mesh: Mesh, specs: dict) -> None:
    index = reader.index
    saved, wanted = index.get("config", {}).get("optim", {}).get("name"), _optimizer_name(optimizer)
    if saved and wanted and saved != wanted:
        raise CheckpointError(f"{reader.path / INDEX}: holds {saved} state but this run's optimizer is {wanted}; "
                              f"resume with --optim.name={saved}, or start from its weights with "
                              f"--train.init_from={reader.path}")
    names = {id(p): n for n, p in model.named_parameters()}
    if is_zero_optimizer(optimizer):
        sync = optimizer.sync
        for shard, bucket in zip(optimizer.shards, sync.buckets):
            lo, hi = sync.shard_range(bucket)
            state: dict[str, torch.Tensor] = {}
            for p, offset in zip(bucket.params, bucket.offsets):
                start, stop = max(lo, offset), min(hi, offset + p.numel())
                if start >= stop:
                    continue
                spec = specs[names[id(p)]]
                elementwise, bound, scalars = _state_keys(index, spec.global_name)
                if bound:
                    raise CheckpointError(f"{reader.path / INDEX}: {spec.global_name!r} has layout-bound optimizer "
                                          "state (Adafactor), which ZeRO-1 cannot hold; resume with parallel.zero=0")
                for key in elementwise:
                    full = state.setdefault(key, torch.zeros(hi - lo, dtype=shard.dtype))
                    for box in flat_range_boxes(tuple(p.shape), start - offset, stop - offset):
                        # Read the local tensor's region row-block by row-block: only what the slice needs.
                        global_box = tuple((a + o, b + o) for (a, b), (o, _) in zip(box, spec.box))
                        part = reader.region(f"{spec.global_name}/{key}", global_box, spec.global_shape)
                        first = _flat_index(tuple(p.shape), box) + offset - lo
                        full[first:first + part.numel()] = part.reshape(-1).to(full.dtype)
                for key in scalars:
                    state[key] = torch.tensor(index["scalars"][f"{spec.global_name}/{key}"], dtype=torch.float32)
            # Step counts stay on the CPU, where torch's (non-capturable) AdamW keeps them.
            optimizer.inner.state[shard] = {k: v if v.ndim == 0 else v.to(shard.device) for k, v in state.items()}
            _refresh_zero_master(shard, bucket, lo, hi)
        return
    optimizer.state.clear()
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        spec = specs[names[id(p)]]
        elementwise, bound, scalars = _state_keys(index, spec.global_name)
        state = {}
        for key in elementwise:
            state[key] = reader.region(f"{spec.global_name}/{key}", spec.box, spec.global_shape).to(p.device)
        for key in bound:
            state[key] = bound_state(reader, f"{spec.global_name}/{key}", spec.box).to(p.device)
        for key in scalars:
            state[key] = torch.tensor(index["scalars"][f"{spec.global_name}/{key}"], dtype=torch.float32)
        if state:
            optimizer.state[p] = state


@torch.no_grad()
def _refresh_zero_master(shard: torch.Tensor, bucket, lo: int, hi: int) -> None:
    """ZeRO-1 steps a flat copy of its slice of the weights: copy the just-loaded weights into it."""
    for p, offset in zip(bucket.params, bucket.offsets):
        start, stop = max(lo, offset), min(hi, offset + p.numel())
        if start < stop:
            shard[start - lo:stop - lo] = p.detach().reshape(-1)[start - offset:stop - offset].to(shard.dtype)


def _flat_index(shape: tuple[int, ...], box: Box) -> int:
    """Row-major offset of a box's first element."""
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return sum(a * s for (a, _), s in zip(box, strides))


def bound_state(reader: Reader, name: str, box: Box) -> torch.Tensor:
    entry = reader.index["bound_state"][name]
    for piece in entry["pieces"]:
        if [list(b) for b in box] == piece["box"]:
            return reader.read_piece(piece, name)
    held = [piece["box"] for piece in entry["pieces"]]
    raise CheckpointError(f"{reader.path / INDEX}: optimizer state {name!r} (Adafactor's factored moments) was saved "
                          f"for the slices {held[:3]} and depends on them; this layout needs slice "
                          f"{[list(b) for b in box]}: resume with the saved tensor-parallel degree "
                          f"(layout {reader.index['layout']})")


def _restore_rng(reader: Reader, index: dict, mesh: Mesh) -> None:
    """This rank's RNG states when the layout is the one saved; rank 0's otherwise."""
    same = index["world_size"] == mesh.world_size and index["layout"] == {"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp}
    rank = mesh.rank if same else 0
    record = next(r for r in index["ranks"] if r["rank"] == rank)
    file = f"rng-r{rank:05d}.safetensors"
    handle = reader._open(file, "rng")
    _set_rng_state({k: handle.get_tensor(k) for k in handle.keys()}, record["rng"])
