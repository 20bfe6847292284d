"""Every collective the engine runs, and the one tally of the bytes they move.

Tensor parallelism's collectives are small autograd functions; data parallelism's bucket reductions
(`all_reduce_async`, `reduce_scatter_async`), ZeRO-1's all-gather, the pipeline's batched send/receive
(`batch_isend_irecv`) and the state broadcasts are plain calls. All of them record what they move here.

Megatron-LM (Shoeybi et al. 2019) names the two operators that bracket a tensor-parallel region f and g;
sequence parallelism (Korthikanti et al. 2022) replaces them by an all-gather and a reduce-scatter along
the sequence. Each function below is a no-op on a group of one rank (or no group at all: `group=None`
here means "a single process", never torch's default world group), so single-process tests reach them.

    with count_bytes() as tally:      # what the collectives moved, per kind (benchmarks/comm_volume.py)
        loss.backward()
    tally.total_sent()                # bytes this rank sent, every kind together
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommTally:
    """Per collective kind: calls, payload bytes (the full tensor reduced or gathered) and the bytes each rank
    sends under the ring algorithm NCCL and gloo use (all-reduce 2(t-1)/t of the payload, all-gather and
    reduce-scatter (t-1)/t of it)."""

    calls: Counter = field(default_factory=Counter)
    payload_bytes: Counter = field(default_factory=Counter)
    sent_bytes: Counter = field(default_factory=Counter)

    def total_sent(self) -> int:
        return sum(self.sent_bytes.values())


# The tallies open in this process. A module-level stack because the collectives run deep inside autograd,
# where no argument can reach them; it is only read by count_bytes() users.
_open_tallies: list[CommTally] = []

# Bytes each rank sends per payload byte. A point-to-point "send" sends its tensor once; a broadcast counts as
# a pipelined chain, where every rank but the last forwards the payload: (t-1)/t of it per rank on average.
_RING_SHARE = {"all_reduce": lambda t: 2 * (t - 1) / t, "all_gather": lambda t: (t - 1) / t,
               "reduce_scatter": lambda t: (t - 1) / t, "broadcast": lambda t: (t - 1) / t, "send": lambda t: 1}


@contextlib.contextmanager
def count_bytes():
    """Tally every collective of this module run inside the block (forward and backward alike)."""
    tally = CommTally()
    _open_tallies.append(tally)
    try:
        yield tally
    finally:
        _open_tallies.remove(tally)


def _record(kind: str, payload: torch.Tensor | int, world: int) -> None:
    nbytes = payload if isinstance(payload, int) else payload.numel() * payload.element_size()
    for tally in _open_tallies:
        tally.calls[kind] += 1
        tally.payload_bytes[kind] += nbytes
        tally.sent_bytes[kind] += int(nbytes * _RING_SHARE[kind](world))


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- plain collectives (no autograd) -------------------------------------------------------------------
def all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """Reduce `x` in place over the group ("sum" or "max") and return it."""
    world = group_size(group)
    if world == 1:
        return x
    _record("all_reduce", x, world)
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return x


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    _record("all_gather", x.numel() * x.element_size() * world, world)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's chunk (along `dim`) of the sum of every rank's `x`."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"reduce_scatter: dimension {dim} of shape {tuple(x.shape)} does not divide by the "
                         f"group size {world}")
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    _record("reduce_scatter", x, world)
    dist.reduce_scatter(out, parts, group=group)
    return out


def all_reduce_async(x: torch.Tensor, group):
    """Start summing `x` in place over the group; returns the work to wait for (None on one rank)."""
    world = group_size(group)
    if world == 1:
        return None
    _record("all_reduce", x, world)
    return dist.all_reduce(x, group=group, async_op=True)


def reduce_scatter_async(out: torch.Tensor, x: torch.Tensor, group):
    """Start writing this rank's equal flat chunk of the sum of every rank's `x` into `out`; returns the work."""
    world = group_size(group)
    if world == 1:
        out.copy_(x)
        return None
    _record("reduce_scatter", x, world)
    return dist.reduce_scatter(out, list(x.chunk(world)), group=group, async_op=True)


def broadcast(x: torch.Tensor, group, src: int) -> torch.Tensor:
    """`x` of group rank `src` into `x` on every rank of the group (in place)."""
    world = group_size(group)
    if world == 1:
        return x
    _record("broadcast", x, world)
    dist.broadcast(x, group=group, group_src=src)
    return x


def batch_isend_irecv(ops: list[dist.P2POp]) -> list:
    """Post a batch of point-to-point sends and receives (dist.batch_isend_irecv), counting the bytes sent."""
    for op in ops:
        if op.op is dist.isend:
            _record("send", op.tensor, 2)
    return dist.batch_isend_irecv(ops)


def local_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's equal chunk of `x` along `dim` (no communication)."""
    world = group_size(group)
    if world == 1:
        return x
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


# ---- autograd functions --------------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    """Megatron's f. Forward: identity (the input is replicated on every rank of the group).
    Backward: all-reduce (sum) the gradient, since each rank's column-parallel slice contributed a part."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Megatron's g. Forward: all-reduce (sum) the partial outputs of a row-parallel layer.
    Backward: identity (the gradient of a replicated output is already the same on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """Sequence parallelism's entry to a tensor-parallel region. Forward: all-gather the sequence chunks along
    `dim`. Backward: reduce-scatter the gradient along `dim` (sum the ranks' partial gradients, keep ours)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Sequence parallelism's exit from a tensor-parallel region. Forward: reduce-scatter the partial outputs
    along `dim`. Backward: all-gather the gradient chunks along `dim`."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherReplicated(torch.autograd.Function):
    """Assemble a sharded tensor whose consumer is replicated (the full logits). Forward: all-gather along
    `dim`. Backward: keep this rank's chunk of the gradient (every rank holds the same full gradient)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return local_chunk(grad, ctx.group, ctx.dim), None, None


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group, dim)


def reduce_scatter_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterSequence.apply(x, group, dim)


def gather_replicated(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherReplicated.apply(x, group, dim)
