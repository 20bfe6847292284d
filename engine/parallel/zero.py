"""ZeRO-1 (Rajbhandari et al. 2020): which elements each data-parallel rank's slice of a gradient bucket
covers, and the AdamW that steps only those.

    lo, hi = slice_range(bucket, rank, dp)             # this rank's flat elements of the bucket
    for part in slice_parts(bucket, lo, hi):           # the parameters (and their elements) the slice covers
        for box, start, stop in part.boxes(): ...      # as boxes of the parameter, with their slice positions
    optimizer = ZeroAdamW(sync, cfg.optim)

A bucket (engine/parallel/data.py) lays its parameters' gradients end to end in one flat buffer, padded to a
multiple of dp, and rank r of dp holds the r-th equal slice of it. This module is the one place that maps a
slice back to parameters: the optimizer's flat master copy, the gradient norm under ZeRO-1
(`slice_square_sum`), the shard specs of the optimizer state checkpoints save (engine/parallel/specs.py) and
the checkpoint loader that fills a slice from any saved layout (engine/checkpoint/load.py) all go through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from engine.config import OptimConfig
from engine.parallel import comm
from engine.parallel.boxes import Box, box_shape, flat_range_boxes

if TYPE_CHECKING:
    from engine.parallel.data import Bucket, GradientSync


def slice_range(bucket: "Bucket", rank: int, dp: int) -> tuple[int, int]:
    """[lo, hi): data-parallel rank `rank`'s flat elements of the bucket (numel is a multiple of dp)."""
    size = bucket.numel // dp
    return rank * size, (rank + 1) * size


@dataclass(frozen=True)
class SlicePart:
    """The part of one parameter that a flat slice holds: slice positions [start, stop) hold the
    parameter's row-major elements [param_start, param_stop)."""

    param: nn.Parameter
    start: int
    stop: int
    param_start: int
    param_stop: int

    def boxes(self) -> list[tuple[Box, int, int]]:
        """The elements as boxes of the parameter (local shape), each with its [start, stop) in the slice."""
        out, position = [], self.start
        for box in flat_range_boxes(tuple(self.param.shape), self.param_start, self.param_stop):
            n = 1
            for size in box_shape(box):
                n *= size
            out.append((box, position, position + n))
            position += n
        return out


def slice_parts(bucket: "Bucket", lo: int, hi: int) -> list[SlicePart]:
    """The parameters the flat slice [lo, hi) of a bucket covers, in bucket order (the padding covers none)."""
    parts = []
    for p, offset in zip(bucket.params, bucket.offsets):
        start, stop = max(lo, offset), min(hi, offset + p.numel())
        if start < stop:
            parts.append(SlicePart(p, start - lo, stop - lo, start - offset, stop - offset))
    return parts


@torch.no_grad()
def copy_params_into_slice(flat: torch.Tensor, bucket: "Bucket", lo: int, hi: int) -> None:
    """Write the parameters' current values into a flat slice [lo, hi) of their bucket."""
    for part in slice_parts(bucket, lo, hi):
        flat[part.start:part.stop] = part.param.detach().reshape(-1)[part.param_start:part.param_stop].to(flat.dtype)


def slice_square_sum(sync: "GradientSync", counted: set[int]) -> torch.Tensor:
    """Sum of squares of this rank's reduced gradient slices, over the elements of `counted` parameters."""
    total = torch.zeros((), dtype=torch.float32, device=sync.buckets[0].params[0].device)
    for bucket in sync.buckets:
        for part in slice_parts(bucket, *sync.shard_range(bucket)):
            if id(part.param) in counted:
                total += bucket.shard[part.start:part.stop].float().pow(2).sum()
    return total


class ZeroAdamW:
    """AdamW whose state covers only this data-parallel rank's slice of every gradient bucket (ZeRO stage 1).

    The slices are flat fp32 copies of the parameters; AdamW is elementwise, so stepping a flat slice is the
    same arithmetic as stepping the parameters it covers. After the step every rank all-gathers the updated
    slices into its parameters. Quacks like a torch optimizer for the loop: param_groups, step, zero_grad.
    """

    def __init__(self, sync: "GradientSync", o: OptimConfig):
        if o.name != "adamw":
            raise ValueError(f"parallel.zero=1 shards AdamW's elementwise state; optim.name={o.name!r} factors "
                             "whole matrices and cannot be split flat; use optim.name=adamw or parallel.zero=0")
        self.sync = sync
        self.shards: list[nn.Parameter] = []
        groups = [{"params": [], "weight_decay": o.weight_decay}, {"params": [], "weight_decay": 0.0}]
        for bucket in sync.buckets:
            lo, hi = sync.shard_range(bucket)
            first = bucket.params[0]
            flat = torch.zeros(hi - lo, dtype=first.dtype, device=first.device)
            copy_params_into_slice(flat, bucket, lo, hi)
            shard = nn.Parameter(flat)
            self.shards.append(shard)
            groups[bucket.group_index]["params"].append(shard)
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2),
                                       eps=o.eps, foreach=False)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for shard, bucket in zip(self.shards, self.sync.buckets):
            shard.grad = bucket.shard
        self.inner.step()
        for shard, bucket in zip(self.shards, self.sync.buckets):
            full = comm.all_gather(shard.detach(), self.sync.group, 0)
            for p, offset in zip(bucket.params, bucket.offsets):
                p.copy_(full[offset:offset + p.numel()].view_as(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for shard in self.shards:
            shard.grad = None
        for bucket in self.sync.buckets:
            bucket.shard = None
            for p in bucket.params:
                p.grad = None
