"""What each rank holds of every global tensor: the sharding description checkpoints save and load by.

    specs = parameter_specs(model, mesh)          # {local name: ShardSpec(global name, global shape, box, owner)}
    pieces = optimizer_pieces(optimizer, model, mesh)   # this rank's optimizer-state regions, by global name

A region of a global tensor is a `box`: one (start, stop) pair per dimension. Nothing here re-derives the
layout; it reads what the layouts record:
    tensor parallelism   `tensor.shard_dims(model)` (the dimension each module splits) and mesh.tp_rank: the
                         slices are equal and contiguous, in tp-rank order;
    pipeline             stages delete modules and keep the single-device names, so a local name is global;
                         the last stage's copy of a tied embedding is `pipeline.is_tied_copy`;
    data parallelism     replicas hold the same tensors; ZeRO-1's `ZeroAdamW` steps a flat slice of each
                         gradient bucket (`sync.buckets`, `sync.shard_range`), mapped back here to the
                         parameters and boxes it covers.
For the offline converter the same boxes come from the pure functions of the layout (`tensor.plan_kind`,
`pipeline.stage_layers`) in `layout_boxes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.parallel.mesh import Mesh
from engine.parallel.tensor import (ColumnInputNorm, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelOutputHead, plan_kind, shard_dims)

Box = tuple[tuple[int, int], ...]

# TP_PLAN kind -> the dimension its tensor-parallel module splits (each module class records it).
_KIND_CLASSES = {"column": ColumnParallelLinear, "row": RowParallelLinear, "column_input": ColumnInputNorm,
                 "vocab_embedding": VocabParallelEmbedding, "vocab_output": VocabParallelOutputHead}


def planned_shard_dim(param_name: str) -> int | None:
    """The dimension tensor parallelism splits a single-device parameter along (None: replicated)."""
    kind = plan_kind(param_name.rsplit(".", 1)[0])
    return None if kind is None else _KIND_CLASSES[kind].shard_dim


@dataclass(frozen=True)
class ShardSpec:
    global_name: str
    global_shape: tuple[int, ...]
    box: Box
    """The region of the global tensor this rank's local tensor is."""
    owner: bool
    """Whether this rank saves the region for its data-parallel replica: tp rank 0 for tensors replicated
    over tp, the first stage for a tied embedding, every rank for its tp slice."""
    dp_rank: int

    @property
    def writes(self) -> bool:
        """Exactly one rank in the world writes each region: the owner in the first data-parallel replica."""
        return self.owner and self.dp_rank == 0


def split_box(global_shape: tuple[int, ...], dim: int | None, rank: int, world: int) -> Box:
    """Rank `rank`'s region of an equal contiguous split along `dim` (the whole tensor when dim is None)."""
    box = [(0, n) for n in global_shape]
    if dim is not None and world > 1:
        size = global_shape[dim] // world
        box[dim] = (rank * size, (rank + 1) * size)
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The row-major elements [start, stop) of a tensor of `shape`, as at most 2 ndim - 1 boxes."""
    if start >= stop:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, first + 1),) + box for box in flat_range_boxes(shape[1:], start - first * inner,
                                                                            stop - first * inner)]
    out = []
    if start % inner:  # a partial leading row
        out += [((first, first + 1),) + box for box in flat_range_boxes(shape[1:], start % inner, inner)]
        first += 1
    whole_end = last if stop % inner else last + 1
    if first < whole_end:
        out.append(((first, whole_end),) + tuple((0, n) for n in shape[1:]))
    if stop % inner:  # a partial trailing row
        out += [((last, last + 1),) + box for box in flat_range_boxes(shape[1:], 0, stop % inner)]
    return out


def offset_box(box: Box, origin: Box) -> Box:
    """A box in a local tensor's coordinates moved into the global tensor's (the local tensor is `origin`)."""
    return tuple((a + o, b + o) for (a, b), (o, _) in zip(box, origin))


def _is_tied_copy(model: torch.nn.Module, param: torch.nn.Parameter, mesh: Mesh) -> bool:
    if getattr(model, "pipeline", None) is None:
        return False
    from engine.parallel.pipeline import is_tied_copy

    return is_tied_copy(model, param, mesh.pp_rank)


def parameter_specs(model: torch.nn.Module, mesh: Mesh) -> dict[str, ShardSpec]:
    """Every local parameter's global name, global shape, region, and who writes it."""
    dims = shard_dims(model)
    specs = {}
    for name, p in model.named_parameters():
        dim = dims.get(name)
        global_shape = tuple(n * mesh.tp if i == dim else n for i, n in enumerate(p.shape))
        owner = (dim is not None or mesh.tp_rank == 0) and not _is_tied_copy(model, p, mesh)
        specs[name] = ShardSpec(name, global_shape, split_box(global_shape, dim, mesh.tp_rank, mesh.tp), owner,
                                mesh.dp_rank)
    return specs


@dataclass(frozen=True)
class StatePiece:
    """A region of one optimizer-state tensor held by this rank."""

    global_name: str
    """"<parameter global name>/<state key>", e.g. "layers.0.attn.wq.weight/exp_avg"."""
    global_shape: tuple[int, ...]
    box: Box
    tensor: torch.Tensor
    """The region's values, shaped like the box."""


def is_zero_optimizer(optimizer) -> bool:
    return hasattr(optimizer, "sync") and hasattr(optimizer, "shards")


def optimizer_pieces(optimizer, model: torch.nn.Module, mesh: Mesh
                     ) -> tuple[list[StatePiece], dict[str, float], list[StatePiece]]:
    """This rank's share of the optimizer state to save: elementwise regions (resharded freely on load),
    0-d scalars such as step counts, and layout-bound tensors (Adafactor's factors, whose values depend on
    the slice they were computed over: they load only into the same slice)."""
    specs = parameter_specs(model, mesh)
    names = {id(p): n for n, p in model.named_parameters()}
    pieces, scalars, bound = [], {}, []
    if is_zero_optimizer(optimizer):
        sync = optimizer.sync
        for shard, bucket in zip(optimizer.shards, sync.buckets):
            state = optimizer.inner.state.get(shard, {})
            lo, hi = sync.shard_range(bucket)
            for p, offset in zip(bucket.params, bucket.offsets):
                spec = specs[names[id(p)]]
                start, stop = max(lo, offset), min(hi, offset + p.numel())
                if start >= stop or not spec.owner:  # under ZeRO-1 every replica writes its own slice
                    continue
                for key, value in state.items():
                    if value.ndim == 0:
                        scalars[f"{spec.global_name}/{key}"] = float(value)
                        continue
                    flat = value[start - lo:stop - lo]
                    done = 0
                    for box in flat_range_boxes(tuple(p.shape), start - offset, stop - offset):
                        n = math.prod(box_shape(box))
                        pieces.append(StatePiece(f"{spec.global_name}/{key}", spec.global_shape,
                                                 offset_box(box, spec.box), flat[done:done + n].view(box_shape(box))))
                        done += n
        return pieces, scalars, bound
    for p, state in optimizer.state.items():
        spec = specs[names[id(p)]]
        if not spec.writes:
            continue
        for key, value in state.items():
            if not torch.is_tensor(value) or value.ndim == 0:
                scalars[f"{spec.global_name}/{key}"] = float(value)
            elif tuple(value.shape) == tuple(p.shape):
                pieces.append(StatePiece(f"{spec.global_name}/{key}", spec.global_shape, spec.box, value))
            else:
                bound.append(StatePiece(f"{spec.global_name}/{key}", tuple(value.shape), spec.box, value))
    return pieces, scalars, bound


def layout_boxes(cfg, shapes: dict[str, tuple[int, ...]], pp: int, tp: int, pp_rank: int, tp_rank: int
                 ) -> dict[str, Box]:
    """Offline twin of parameter_specs for the converter: the regions pipeline rank `pp_rank`, tensor rank
    `tp_rank` writes under pp x tp, from the layouts' own pure rules (TP_PLAN; the pipeline's stage split)."""
    n_layers = cfg.model.n_layers
    if pp > 1:
        from engine.parallel.pipeline import head_cost, stage_layers

        mine = {i for r in stage_layers(n_layers, pp, pp_rank, 1, head_cost(cfg.model)) for i in r}
    else:
        mine = set(range(n_layers))
    out = {}
    for name, shape in shapes.items():
        if name.startswith("layers."):
            held = int(name.split(".")[1]) in mine
        elif name.startswith("tok_embeddings."):
            held = pp_rank == 0
        else:  # the final norm and an untied head
            held = pp_rank == pp - 1
        dim = planned_shard_dim(name)
        if held and (dim is not None or tp_rank == 0):
            out[name] = split_box(shape, dim if tp > 1 else None, tp_rank, tp)
    return out
