"""Loading: each rank reads only the regions its own tensors need, from a checkpoint of any layout.

    index = load_checkpoint(path, layout, optimizer)    # every rank, no collectives: weights, state, RNG
    state = load_model_state(path)                      # every weight whole, for one-device consumers

Through safetensors' lazy slices a rank reads the overlap of each stored piece with its region (`Reader`).
Optimizer state reshards too: elementwise state (AdamW's moments) by region, step counts from the index, and
layout-bound state (Adafactor's factored moments, which depend on the slice they were computed over) only
into the same slice; a ZeRO-1 optimizer's flat slices are filled through engine/parallel/zero.py's mapping.
A missing, truncated or corrupted file, or a shape that does not fit the config, raises CheckpointError
naming the file and the tensor.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from engine.checkpoint.format import (DTYPES, INDEX, CheckpointError, confined, crc, load_meta, rng_file,
                                      set_rng_state)
from engine.parallel.boxes import Box, box_shape, intersect, offset_box
from engine.parallel.layout import Layout
from engine.parallel.mesh import Mesh
from engine.parallel.zero import ZeroAdamW, copy_params_into_slice, slice_parts


class Reader:
    """Lazily opened safetensors files of one checkpoint; regions of global tensors assembled from pieces.

    Every byte handed out is verified: the first time any part of a stored piece is needed the whole piece is
    read and checked against its crc32 (a slice alone cannot be), later parts of it are sliced lazily; the
    RNG tensors are checked the same way. `keep_open=False` closes each file once a piece is read from it:
    pages read through an open file's mapping stay resident until it is closed, so a caller that reads
    tensor by tensor (export) then holds only the tensor being assembled and one piece."""

    def __init__(self, path: Path, index: dict, keep_open: bool = True):
        self.path, self.index, self.keep_open = path, index, keep_open
        self.handles: dict[str, Any] = {}
        self.verified: set[tuple[str, str]] = set()

    def _open(self, file: str, tensor: str):
        if file in self.handles:
            return self.handles[file]
        path = confined(self.path, file, str(self.path / INDEX))
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

    def _verified(self, file: str, key: str, name: str, checksum: int, shape: tuple[int, ...] | None):
        """The stored tensor `key` of `file`, whole, after its checksum (and shape) are checked."""
        where = self.path / file
        try:
            data = self._open(file, name).get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{where}: cannot read tensor {name!r} (key {key!r}): {e}; the file is truncated "
                                  "or corrupted, resume from an older checkpoint") from None
        if shape is not None and tuple(data.shape) != shape:
            raise CheckpointError(f"{where}: tensor {name!r} (key {key!r}) holds shape {tuple(data.shape)} where "
                                  f"index.json says {shape}; the checkpoint is damaged, resume from an older one")
        if crc(data) != checksum:
            raise CheckpointError(f"{where}: tensor {name!r} (key {key!r}) fails its checksum: the file is "
                                  "corrupted; resume from an older checkpoint")
        self.verified.add((file, key))
        return data

    def read_piece(self, piece: dict, name: str, region: Box | None = None, *, boxed: bool = True) -> torch.Tensor:
        """A piece's values (the part inside `region`, in global coordinates, when given), verified; `boxed`:
        the stored tensor has its box's shape (not so for layout-bound state, which is read whole)."""
        file, key, box = piece["file"], piece["key"], piece["box"]
        local = None if region is None or [list(b) for b in region] == box else \
            tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(region, box))
        try:
            if (file, key) not in self.verified:
                data = self._verified(file, key, name, piece["crc32"], tuple(b - a for a, b in box) if boxed else None)
                return data if local is None else data[local]
            try:
                lazy = self._open(file, name).get_slice(key)
                return lazy[local] if local is not None else self._open(file, name).get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{self.path / file}: cannot read tensor {name!r} (key {key!r}): {e}; the file "
                                      "is truncated or corrupted, resume from an older checkpoint") from None
        finally:
            if not self.keep_open:
                self.handles.pop(file, None)

    def rng(self, rank: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s torch RNG tensors, each checked against the checksum its record holds (checkpoints
        from before RNG checksums existed carry none)."""
        record = next((r for r in self.index["ranks"] if r["rank"] == rank), None)
        if record is None:
            raise CheckpointError(f"{self.path / INDEX}: no record of rank {rank}'s RNG state; the index is damaged")
        file = rng_file(rank)
        handle = self._open(file, "rng")
        sums = record.get("rng_crc32")
        if sums is None:
            return {k: handle.get_tensor(k) for k in handle.keys()}
        if set(sums) != set(handle.keys()):
            raise CheckpointError(f"{self.path / file}: holds RNG tensors {sorted(handle.keys())}, index.json "
                                  f"recorded {sorted(sums)}; the checkpoint is damaged, resume from an older one")
        return {k: self._verified(file, k, "rng", sums[k], None) for k in sums}

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

    def region(self, name: str, box: Box, expected_shape: tuple[int, ...] | None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """The `box` region of global tensor `name` (in `dtype`, default the saved one), read from the pieces that
        overlap it."""
        entry = self.entry(name, expected_shape)
        out = torch.empty(box_shape(box), dtype=dtype or DTYPES[entry["dtype"]])
        covered = 0
        for piece in entry["pieces"]:
            overlap = intersect(tuple(tuple(b) for b in piece["box"]), box)
            if overlap is None:
                continue
            data = self.read_piece(piece, name, overlap)
            if data.dtype != out.dtype:
                raise CheckpointError(f"{self.path / piece['file']}: tensor {name!r} is stored as {data.dtype} "
                                      f"where index.json says {entry['dtype']}; the checkpoint is damaged")
            out[tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(overlap, box))] = data
            covered += math.prod(box_shape(overlap))
        if covered != math.prod(box_shape(box)):
            raise CheckpointError(f"{self.path / INDEX}: the pieces of {name!r} cover {covered} of the "
                                  f"{math.prod(box_shape(box))} elements this rank needs; the index is damaged")
        return out

    def full(self, name: str) -> torch.Tensor:
        entry = self.entry(name, None)
        pieces = entry["pieces"]
        if len(pieces) == 1 and pieces[0]["box"] == [[0, n] for n in entry["shape"]]:  # stored whole: no copy
            data = self.read_piece(pieces[0], name)
            if data.dtype == DTYPES[entry["dtype"]]:
                return data
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


def load_checkpoint(path: str | Path, layout: Layout, optimizer) -> dict[str, Any]:
    """Restore this rank's weights, optimizer state and RNG from a checkpoint of any layout; return the index
    (step, data position, config, layout)."""
    path = Path(path)
    reader = load_weights(path, layout)
    index, specs = reader.index, layout.shard_specs()
    if optimizer is not None:
        if index.get("optimizer_kind") is None:
            raise CheckpointError(f"{path}: holds no optimizer state, so training cannot resume from it")
        _check_optimizer(reader, optimizer)
        names = {id(p): n for n, p in layout.named_parameters()}
        if isinstance(optimizer, ZeroAdamW):
            _restore_zero(reader, optimizer, specs, names)
        else:
            _restore_torch(reader, optimizer, specs, names)
    _restore_rng(reader, index, layout.mesh)
    return index


def load_weights(path: str | Path, layout: Layout) -> Reader:
    """Fill this rank's parameters with their regions of a checkpoint of any layout (only those slices are read,
    straight into the parameters' dtype): resume and train.init_from. Returns the open reader."""
    path = Path(path)
    reader = Reader(path, load_meta(path))
    saved = {n for n, e in reader.index["tensors"].items() if e["kind"] == "model"}
    expected = _expected_names(layout)
    if saved != expected:
        raise CheckpointError(f"{path / INDEX}: the checkpoint's weights do not match the configured model: missing "
                              f"{sorted(expected - saved)[:4]}, unexpected {sorted(saved - expected)[:4]}; load it "
                              "with the config it was saved with (index.json holds it)")
    specs = layout.shard_specs()
    with torch.no_grad():
        for name, p in layout.named_parameters():
            spec = specs[name]
            p.copy_(reader.region(spec.global_name, spec.box, spec.global_shape, dtype=p.dtype))
    return reader


def _expected_names(layout: Layout) -> set[str]:
    """The global parameter names of the whole single-device model this rank's part belongs to."""
    from engine.model import Transformer

    with torch.device("meta"):
        return {name for name, _ in Transformer(layout.cfg.model).named_parameters()}


def _state_keys(index: dict, global_name: str) -> tuple[list[str], list[str], list[str]]:
    prefix = global_name + "/"
    strip = len(prefix)
    elementwise = [n[strip:] for n, e in index["tensors"].items() if e["kind"] == "optim" and n.startswith(prefix)]
    bound = [n[strip:] for n in index["bound_state"] if n.startswith(prefix)]
    scalars = [n[strip:] for n in index["scalars"] if n.startswith(prefix)]
    return elementwise, bound, scalars


def _optimizer_name(optimizer) -> str | None:
    inner = optimizer.inner if isinstance(optimizer, ZeroAdamW) else optimizer
    return {torch.optim.AdamW: "adamw", torch.optim.Adafactor: "adafactor"}.get(type(inner))


def _check_optimizer(reader: Reader, optimizer) -> None:
    saved = reader.index.get("config", {}).get("optim", {}).get("name")
    wanted = _optimizer_name(optimizer)
    if saved and wanted and saved != wanted:
        raise CheckpointError(f"{reader.path / INDEX}: holds {saved} state but this run's optimizer is {wanted}; "
                              f"resume with --optim.name={saved}, or start from its weights with "
                              f"--train.init_from={reader.path}")


def _restore_zero(reader: Reader, optimizer: ZeroAdamW, specs: dict, names: dict[int, str]) -> None:
    """Fill every flat ZeRO-1 slice from the saved regions of the parameters it covers (read box by box: only
    what the slice needs), then refresh its master copy of the weights just loaded."""
    index, sync = reader.index, optimizer.sync
    for shard, bucket in zip(optimizer.shards, sync.buckets):
        lo, hi = sync.shard_range(bucket)
        state: dict[str, torch.Tensor] = {}
        for part in slice_parts(bucket, lo, hi):
            spec = specs[names[id(part.param)]]
            elementwise, bound, scalars = _state_keys(index, spec.global_name)
            if bound:
                raise CheckpointError(f"{reader.path / INDEX}: {spec.global_name!r} has layout-bound optimizer "
                                      "state (Adafactor), which ZeRO-1 cannot hold; resume with parallel.zero=0")
            for key in elementwise:
                flat = state.setdefault(key, torch.zeros(hi - lo, dtype=shard.dtype))
                for box, start, stop in part.boxes():
                    region = reader.region(f"{spec.global_name}/{key}", offset_box(box, spec.box), spec.global_shape)
                    flat[start:stop] = region.reshape(-1).to(flat.dtype)
            for key in scalars:
                state[key] = torch.tensor(index["scalars"][f"{spec.global_name}/{key}"], dtype=torch.float32)
        # Step counts stay on the CPU, where torch's (non-capturable) AdamW keeps them.
        optimizer.inner.state[shard] = {k: v if v.ndim == 0 else v.to(shard.device) for k, v in state.items()}
        copy_params_into_slice(shard.data, bucket, lo, hi)


def _restore_torch(reader: Reader, optimizer, specs: dict, names: dict[int, str]) -> None:
    index = reader.index
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


def bound_state(reader: Reader, name: str, box: Box) -> torch.Tensor:
    entry = reader.index["bound_state"][name]
    for piece in entry["pieces"]:
        if [list(b) for b in box] == piece["box"]:
            return reader.read_piece(piece, name, boxed=False)
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
    set_rng_state(reader.rng(rank), record["rng"])
