"""What each rank holds of every global tensor: the sharding description checkpoints save and load by.

    specs = layout.shard_specs()                        # {local name: ShardSpec(global name, shape, box, owner)}
    pieces, scalars, bound = optimizer_pieces(layout, optimizer)   # this rank's optimizer-state regions

A region of a global tensor is a `box` (engine/parallel/boxes.py). Nothing here re-derives the layout; it
reads what the layout recorded when it was applied:
    tensor parallelism   the dimension each sharded tensor is split along (`TensorParallelShards.dims`) and
                         the mesh's tp rank: the slices are equal and contiguous, in tp-rank order;
    pipeline             stages delete modules and keep the single-device names, so a local name is global;
                         the last stage's copy of a tied embedding (`PipelineStages.is_tied_copy`) is not
                         written;
    data parallelism     replicas hold the same tensors; ZeRO-1's `ZeroAdamW` steps a flat slice of each
                         gradient bucket, mapped back to parameters and boxes by engine/parallel/zero.py.
For the offline converter the same boxes come from the pure rules of the layout (`tensor.planned_shard_dim`,
`pipeline.stage_layers`) in `layout_boxes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.parallel.boxes import Box, box_shape, offset_box, split_box
from engine.parallel.mesh import Mesh
from engine.parallel.tensor import planned_shard_dim
from engine.parallel.zero import ZeroAdamW, slice_parts

if TYPE_CHECKING:
    from engine.parallel.layout import Layout


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


def parameter_specs(named_parameters, dims: dict[str, int], skipped: set[int], mesh: Mesh) -> dict[str, ShardSpec]:
    """Every local parameter's global name, global shape, region, and who writes it. `dims`: the split
    dimension of each tensor-parallel tensor; `skipped`: ids of parameters this rank holds a copy of that
    another rank writes (the last stage's tied embedding)."""
    specs = {}
    for name, p in named_parameters:
        dim = dims.get(name)
        global_shape = tuple(n * mesh.tp if i == dim else n for i, n in enumerate(p.shape))
        owner = (dim is not None or mesh.tp_rank == 0) and id(p) not in skipped
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


def optimizer_pieces(layout: "Layout", optimizer) -> tuple[list[StatePiece], dict[str, float], list[StatePiece]]:
    """This rank's share of the optimizer state to save: elementwise regions (resharded freely on load),
    0-d scalars such as step counts, and layout-bound tensors (Adafactor's factors, whose values depend on
    the slice they were computed over: they load only into the same slice)."""
    specs = layout.shard_specs()
    names = {id(p): n for n, p in layout.named_parameters()}
    if isinstance(optimizer, ZeroAdamW):
        return _zero_pieces(optimizer, specs, names)
    pieces, scalars, bound = [], {}, []
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


def _zero_pieces(optimizer: ZeroAdamW, specs: dict[str, ShardSpec], names: dict[int, str]
                 ) -> tuple[list[StatePiece], dict[str, float], list[StatePiece]]:
    """Under ZeRO-1 every replica writes its own slice: each flat state slice as boxes of the parameters."""
    pieces, scalars = [], {}
    sync = optimizer.sync
    for shard, bucket in zip(optimizer.shards, sync.buckets):
        state = optimizer.inner.state.get(shard, {})
        for part in slice_parts(bucket, *sync.shard_range(bucket)):
            spec = specs[names[id(part.param)]]
            if not spec.owner:
                continue
            for key, value in state.items():
                if value.ndim == 0:
                    scalars[f"{spec.global_name}/{key}"] = float(value)
                    continue
                for box, start, stop in part.boxes():
                    pieces.append(StatePiece(f"{spec.global_name}/{key}", spec.global_shape,
                                             offset_box(box, spec.box), value[start:stop].view(box_shape(box))))
    return pieces, scalars, []


def layout_boxes(cfg, shapes: dict[str, tuple[int, ...]], pp: int, tp: int, pp_rank: int, tp_rank: int
                 ) -> dict[str, Box]:
    """Offline twin of the shard specs for the converter: the regions pipeline rank `pp_rank`, tensor rank
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
