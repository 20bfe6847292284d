"""Pipeline parallelism: split the plain model into stages, and run any schedule's actions on them.

    stages = split_stages(model, cfg, mesh)          # keep this rank's layers (chunks, when interleaved)
    loss = run_schedule(stages, microbatches, loss_scale=1 / total_targets, autocast=ctx)   # training
    outs = run_forward(stages, microbatches, finish, autocast=ctx)   # forward only, pipelined (evaluation)
    outs = run_forward(stages, steps, finish, caches=caches)   # decoding: each chunk extends its KV caches

Stages are made by deleting modules (the model's forward skips a missing embedding, norm or head), so layer
names stay those of the single-device model. With v virtual stages a rank holds v non-contiguous chunks
(global stages rank, rank + pp, ...); each chunk is a view of the rank's model that shares its modules.
`split_stages` returns what the runner needs (`PipelineStages`); the layout (engine/parallel/layout.py) keeps
it, nothing is hung on the model. Layers are split by compute (`split_layers`): a block costs 1, the output
projection (with the loss) costs vocab x d_model over a block's matmul weights per token, the embedding
lookup nothing.

Activations (B_mb, S, d) (S / tp under sequence parallelism) and their gradients move between neighbouring
stages by batched send/receive whose shapes are known ahead, so no shape is ever exchanged. The schedules
themselves are data (engine/parallel/schedules.py). Tied input/output embeddings live on the first and the
last stage; `PipelineStages.sync_tied_embedding` sums their gradients over the two after backward.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.batch import Batch
from engine.config import Config, ModelConfig
from engine.model import KVCache, Transformer
from engine.parallel import comm
from engine.parallel.mesh import Mesh, group_ranks
from engine.parallel.schedules import (Action, check_schedule, comm_batches, forward_only_actions, message_key,
                                       peer_of, schedule_actions, stage_of)


# ---- stage split ---------------------------------------------------------------------------------------
def head_cost(cfg: ModelConfig) -> float:
    """The output projection's matmul work per token in blocks: V d over the block's q, k, v, o and MLP weights
    (attention's S-dependent part is left out: it is small at the sequence lengths FLAN trains on)."""
    attention = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.d_ff
    return cfg.vocab_size * cfg.d_model / (attention + mlp)


def split_layers(n_layers: int, n_stages: int, last_extra: float = 0.0) -> list[range]:
    """Contiguous layer ranges, one per stage, every stage at least one layer, that minimise the costliest
    stage (a layer costs 1, the last stage also `last_extra`), and among those the sum of squared costs; ties
    put layers on later stages, since under 1F1B the early stages hold the most microbatches' activations."""
    if n_layers < n_stages:
        raise ValueError(f"pipeline: model.n_layers={n_layers} cannot be split into parallel.pp x "
                         f"parallel.virtual_stages = {n_stages} stages of at least one layer; lower pp or "
                         "virtual_stages, or use a deeper model")

    def cost(stage: int, layers: int) -> float:
        return layers + (last_extra if stage == n_stages - 1 else 0.0)

    def best(limit: float) -> list[int] | None:
        """Layer counts with every stage's cost <= limit and the least sum of squares (dynamic programme over
        (stages placed, layers placed)); None when no split fits."""
        table = {0: (0.0, [])}  # layers placed -> (sum of squares, counts)
        for stage in range(n_stages):
            nxt: dict[int, tuple[float, list[int]]] = {}
            for placed, (squares, counts) in table.items():
                left_after = n_stages - stage - 1
                for take in range(1, n_layers - placed - left_after + 1):
                    c = cost(stage, take)
                    if c > limit + 1e-9:
                        break
                    candidate = (squares + c * c, counts + [take])
                    if placed + take not in nxt or candidate[0] < nxt[placed + take][0] - 1e-9:
                        nxt[placed + take] = candidate
            table = nxt
        return table[n_layers][1] if n_layers in table else None

    limits = sorted({cost(s, k) for s in range(n_stages) for k in range(1, n_layers + 1)})
    counts = next(c for c in (best(limit) for limit in limits) if c is not None)
    starts = [sum(counts[:i]) for i in range(n_stages)]
    return [range(s, s + k) for s, k in zip(starts, counts)]


def stage_layers(n_layers: int, pp: int, rank: int, virtual: int = 1, last_extra: float = 0.0) -> list[range]:
    """The layer ranges of pipeline rank `rank`'s chunks: global stages rank, rank + pp, ... of pp x virtual."""
    ranges = split_layers(n_layers, pp * virtual, last_extra)
    return [ranges[stage_of(rank, chunk, pp)] for chunk in range(virtual)]


# ---- the stages of this rank ---------------------------------------------------------------------------
Finish = Callable[..., torch.Tensor]
"""finish(chunk, batch, hidden): what the last stage's chunk computes for one microbatch, from the hidden
states it received: a scaled loss in training, the loss or the selected hidden states or logits in a
forward-only pass; with KV caches (decoding) also `cache=` that microbatch's cache of the chunk."""


@dataclass
class PipelineStages:
    """This rank's part of the pipeline: its model chunks, where every layer went, and its neighbours."""

    chunks: list[Transformer]
    """One view per local chunk, in chunk order; each shares the stage model's modules."""
    layer_ranges: list[range]
    """This rank's chunks' layers."""
    stage_ranges: list[range]
    """Every global stage's layers (stage c * pp + r is chunk c of rank r)."""
    pp: int
    pp_rank: int
    virtual: int
    schedule: str
    microbatches: int
    group: dist.ProcessGroup | None
    """The pipeline ranks of this model copy (the mesh's pp group)."""
    device: torch.device
    d_model: int
    sequence_parallel_tp: int = 1
    """The tp degree the sequence is split over between blocks (1 without sequence parallelism)."""
    tied_weight: nn.Parameter | None = None
    """The embedding weight shared with the head, held by the first and the last stage."""
    embedding_group: dist.ProcessGroup | None = None
    """First and last pipeline rank of this tp rank and dp replica (tied embeddings only)."""
    busy_s: float = 0.0
    """Seconds spent in forward and backward compute so far (benchmarks/pipeline_bubble.py)."""

    def is_last_stage(self, chunk: int) -> bool:
        return stage_of(self.pp_rank, chunk, self.pp) == self.pp * self.virtual - 1

    def is_tied_copy(self, param: nn.Parameter) -> bool:
        """Whether `param` is the last stage's copy of the tied embedding (left out of the gradient norm and of
        the checkpoint, so that the weight counts once)."""
        return self.tied_weight is param and self.pp_rank == self.pp - 1

    def sync_tied_embedding(self) -> None:
        """Sum the tied embedding's gradient over the first and the last stage, which each hold half of it."""
        if self.tied_weight is not None and self.tied_weight.grad is not None:
            comm.all_reduce(self.tied_weight.grad, self.embedding_group)

    def owner(self, name: str) -> int:
        """The pipeline rank holding single-device state-dict entry `name` (the embedding on the first, the
        final norm and head on the last, a block where its layer went)."""
        if name.startswith("tok_embeddings."):
            return 0
        if name.startswith(("norm.", "output.")):
            return self.pp - 1
        layer = int(name.split(".")[1])
        stage = next(s for s, r in enumerate(self.stage_ranges) if layer in r)
        return stage % self.pp


def _chunk_view(model: Transformer, layer_names: list[str], embed: bool, head: bool) -> Transformer:
    """A Transformer sharing `model`'s modules but running only the named layers (and the embedding / the
    final norm and head when asked); not registered as a child, so parameters are never listed twice."""
    view = Transformer.__new__(Transformer)
    view.__dict__.update(model.__dict__)
    view._modules = {"tok_embeddings": model.tok_embeddings if embed else None,
                     "layers": nn.ModuleDict({n: model.layers[n] for n in layer_names}),
                     "norm": model.norm if head else None, "output": model.output if head else None}
    return view


def _embedding_group(mesh: Mesh) -> dist.ProcessGroup | None:
    """Create every (first, last) pipeline-rank pair group, in the same order on all ranks; return ours."""
    mine = None
    for ranks in group_ranks(mesh.dp, mesh.pp, mesh.tp, "p"):
        group = dist.new_group([ranks[0], ranks[-1]])
        if mesh.rank in (ranks[0], ranks[-1]):
            mine = group
    return mine


@torch.no_grad()
def split_stages(model: Transformer, cfg: Config, mesh: Mesh) -> PipelineStages:
    """Delete the layers (and embedding / head) that other pipeline ranks hold, in place; a collective call
    when the embeddings are tied (it creates the first-last stage groups)."""
    p = cfg.parallel
    check_schedule(p.schedule, mesh.pp, p.microbatches, p.virtual_stages)
    stage_ranges = split_layers(len(model.layers), mesh.pp * p.virtual_stages, head_cost(model.cfg))
    ranges = [stage_ranges[stage_of(mesh.pp_rank, c, mesh.pp)] for c in range(p.virtual_stages)]
    first, last = mesh.pp_rank == 0, mesh.pp_rank == mesh.pp - 1
    tied = model.cfg.tie_embeddings
    kept = {str(i) for r in ranges for i in r}
    for name in [n for n in model.layers if n not in kept]:
        del model.layers[name]
    if not first and not (last and tied):
        model.tok_embeddings = None  # the last stage keeps a tied one for its weight's single-device name
    if not last:
        model.norm, model.output = None, None
    chunks = [_chunk_view(model, [str(i) for i in r], embed=first and c == 0,
                          head=last and c == p.virtual_stages - 1) for c, r in enumerate(ranges)]
    return PipelineStages(
        chunks=chunks, layer_ranges=ranges, stage_ranges=stage_ranges, pp=mesh.pp, pp_rank=mesh.pp_rank,
        virtual=p.virtual_stages, schedule=p.schedule, microbatches=p.microbatches, group=mesh.pp_group,
        device=mesh.device, d_model=model.cfg.d_model, sequence_parallel_tp=mesh.tp if p.sp else 1,
        tied_weight=model.tok_embeddings.weight if tied and (first or last) else None,
        embedding_group=_embedding_group(mesh) if tied else None)


# ---- the runner ----------------------------------------------------------------------------------------
def run_schedule(stages: PipelineStages, microbatches: list[Batch], *, loss_scale: float,
                 autocast=contextlib.nullcontext, before_last_backward=None) -> torch.Tensor:
    """Run this rank's actions of the configured schedule over `microbatches` (equal row counts) and
    accumulate gradients. Each microbatch's loss is summed and multiplied by loss_scale. Returns the summed
    scaled loss on the last stage and zero elsewhere. `before_last_backward(chunk)` is called before each
    chunk's final backward (data parallelism arms its gradient all-reduce there)."""
    if len(microbatches) != stages.microbatches:
        raise ValueError(f"pipeline: got {len(microbatches)} microbatches for parallel.microbatches="
                         f"{stages.microbatches}")
    program = schedule_actions(stages.schedule, stages.pp, stages.microbatches, stages.virtual)[stages.pp_rank]

    def scaled_loss(chunk: Transformer, batch: Batch, hidden: torch.Tensor | None) -> torch.Tensor:
        return chunk(batch, hidden=hidden, loss_reduction="sum") * loss_scale

    loss = torch.zeros((), device=stages.device, dtype=torch.float32)
    for out in _run_program(stages, program, microbatches, scaled_loss, autocast, before_last_backward):
        loss += out.float()
    return loss


def run_forward(stages: PipelineStages, microbatches: list[Batch], finish: Finish, autocast=contextlib.nullcontext,
                caches: dict[tuple[int, int], KVCache] | None = None) -> list[torch.Tensor] | None:
    """The forward of equal-shaped microbatches through every stage, pipelined (no gradients kept); `finish`'s
    result per microbatch, in order, on the last pipeline rank; None on the others.

    With `caches` (decoding), chunk c of microbatch m attends over and extends caches[(m, c)] (created empty on
    the first call): each pipeline rank keeps the keys and values of its own layers only, so that after the
    prompt a step moves one position's hidden states from stage to stage."""
    program = forward_only_actions(stages.pp, stages.virtual, len(microbatches))[stages.pp_rank]
    with torch.no_grad():
        results = _run_program(stages, program, microbatches, finish, autocast, caches=caches)
    return results or None


def split_microbatches(batch: Batch, count: int) -> list[Batch]:
    """`count` equal row slices of this rank's batch (the pipeline needs one activation shape)."""
    rows = batch.tokens.shape[0]
    if rows % count:
        raise ValueError(f"pipeline: this rank's {rows} rows do not split into parallel.microbatches={count} "
                         "equal microbatches; make train.batch_size / (dp x grad_accum) a multiple of it")
    size = rows // count
    return [batch.slice_rows(i * size, (i + 1) * size) for i in range(count)]


def _run_program(stages: PipelineStages, program: list[Action], microbatches: list[Batch], finish: Finish,
                 autocast, before_last_backward=None, caches: dict | None = None) -> list[torch.Tensor]:
    """Play one rank's program; the last stage's `finish` results (detached), in forward order. `caches`: see
    run_forward (None in training)."""
    rows, seq = microbatches[0].tokens.shape
    shape = (rows, seq // stages.sequence_parallel_tp, stages.d_model)
    dtype = next(stages.chunks[0].parameters()).dtype
    inputs: dict[tuple[int, int], torch.Tensor] = {}  # received activations, kept for their gradient
    outputs: dict[tuple[int, int], torch.Tensor] = {}  # stage outputs (or scaled losses), kept for backward
    grads: dict[tuple[int, int], torch.Tensor] = {}  # received output gradients
    pending_sends: list = []  # (work, tensor): sends are waited for once, at the end
    last_backward = {a.chunk: a for a in program if a.kind == "backward"}
    results: list[torch.Tensor] = []
    for run in comm_batches(program):
        a = run[0]
        key = (a.microbatch, a.chunk)
        started = time.perf_counter()
        if a.kind == "forward":
            chunk, batch = stages.chunks[a.chunk], microbatches[a.microbatch].to(stages.device)
            cached = {} if caches is None else {"cache": caches.setdefault(key, KVCache())}
            with autocast():
                if stages.is_last_stage(a.chunk):
                    out = finish(chunk, batch, inputs.get(key), **cached)
                    results.append(out.detach())
                else:
                    out = chunk(batch, hidden=inputs.get(key), **cached)
            if torch.is_grad_enabled():
                outputs[key] = out
            else:
                outputs[key] = out.detach()
                inputs.pop(key, None)
        elif a.kind == "backward":
            if before_last_backward is not None and last_backward[a.chunk] == a:
                before_last_backward(a.chunk)
            out = outputs.pop(key)
            torch.autograd.backward(out, grads.pop(key, None))
        if a.kind in ("forward", "backward"):
            stages.busy_s += time.perf_counter() - started
        else:
            _exchange(run, stages, shape, dtype, inputs, outputs, grads, pending_sends, len(microbatches))
    for work, _ in pending_sends:
        work.wait()
    return results


def _exchange(run: list[Action], stages: PipelineStages, shape, dtype, inputs, outputs, grads,
              pending_sends, microbatch_count: int) -> None:
    """One batched send/receive for a run of communication actions; waits for its receives only."""
    ops, received = [], []
    for a in run:
        key = (a.microbatch, a.chunk)
        _, _, tag = message_key(a, stages.pp_rank, stages.pp, microbatch_count)
        peer = peer_of(a, stages.pp_rank, stages.pp)
        if a.kind == "send_fwd":
            tensor = outputs[key].detach().contiguous()
        elif a.kind == "send_bwd":
            tensor = inputs.pop(key).grad.contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=stages.device)
            received.append((a, tensor))
        op = dist.isend if a.kind.startswith("send") else dist.irecv
        ops.append(dist.P2POp(op, tensor, group=stages.group, group_peer=peer, tag=tag))
    works = comm.batch_isend_irecv(ops)
    if len(works) == len(ops):  # one work per op (gloo): keep the sends going, wait for the receives
        for op, work in zip(ops, works):
            if op.op is dist.isend:
                pending_sends.append((work, op.tensor))
            else:
                work.wait()
    else:  # coalesced (NCCL): one work for the whole batch
        for work in works:
            work.wait()
    for a, tensor in received:
        key = (a.microbatch, a.chunk)
        if a.kind == "recv_fwd":
            inputs[key] = tensor.requires_grad_(torch.is_grad_enabled())
        else:
            grads[key] = tensor
