"""Data parallelism: gradients summed over the dp replicas in buckets launched from backward hooks.

    sync = GradientSync(model, mesh.dp_group, bucket_mb=25, zero=False, late=[...])
    sync.arm()                 # before the last microbatch's backward: earlier microbatches only accumulate
    loss.backward()            # each bucket's all-reduce starts as soon as its last gradient is accumulated
    sync.wait()                # then model-parallel fix-ups of the `late` parameters, then
    sync.reduce_late()

Buckets hold parameters in reverse registration order (roughly the order backward finishes them) up to
bucket_mb MiB each, never mixing optimizer parameter groups, so that a ZeRO shard of a bucket has one weight
decay. Gradients are summed, not averaged: the training loop divides every microbatch's summed loss by the
global batch's target-token count, so each replica's gradient is already its share of the global one.
`late` parameters (tied embeddings across pipeline stages, sequence-parallel norm gains) get a model-parallel
sum first, so they are reduced after `wait`. With zero=True (ZeRO-1, engine/parallel/zero.py) a bucket is
reduce-scattered instead of all-reduced and each rank keeps its slice in `bucket.shard`. The bytes moved are
counted by engine/parallel/comm.py's tally like every other collective's; `launch_times` records when each
bucket's reduction started (the overlap with backward).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.optim import param_groups
from engine.parallel import comm
from engine.parallel.zero import slice_range


@dataclass(eq=False)
class Bucket:
    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    """Elements of the flat gradient, padded up to a multiple of dp so that every rank's slice is equal."""
    group_index: int
    """The optimizer parameter group (weight decay) of every parameter here."""
    late: bool
    ready: int = 0
    flat: torch.Tensor | None = None
    shard: torch.Tensor | None = None
    work: object = None


class GradientSync:
    """The gradient buckets of this rank's parameters and their reduction over the data-parallel group."""

    def __init__(self, model: nn.Module, group, *, bucket_mb: float, zero: bool, late: list[nn.Parameter],
                 weight_decay: float = 0.0):
        self.group = group
        self.dp = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.zero = zero
        self.launch_times: list[tuple[int, float]] = []
        """(bucket index, time.perf_counter()) of every bucket reduction, in launch order."""
        self.buckets: list[Bucket] = []
        self.bucket_of: dict[int, Bucket] = {}
        self.armed: set[int] = set()
        late_ids = {id(p) for p in late}
        bucket_bytes = max(1, int(bucket_mb * 2**20))
        for index, group_spec in enumerate(param_groups(model, weight_decay)):
            params = [p for p in group_spec["params"] if p.requires_grad]
            for is_late in (False, True):
                chosen = [p for p in reversed(params) if (id(p) in late_ids) == is_late]
                self._make_buckets(chosen, index, is_late, bucket_bytes)
        for bucket in self.buckets:
            if not bucket.late:
                for p in bucket.params:
                    p.register_post_accumulate_grad_hook(self._on_gradient)

    def _make_buckets(self, params: list[nn.Parameter], group_index: int, late: bool, bucket_bytes: int) -> None:
        current: list[nn.Parameter] = []
        size = 0
        for p in params:
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self._add_bucket(current, group_index, late)
                current, size = [], 0
        if current:
            self._add_bucket(current, group_index, late)

    def _add_bucket(self, params: list[nn.Parameter], group_index: int, late: bool) -> None:
        offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
        total = sum(p.numel() for p in params)
        bucket = Bucket(len(self.buckets), params, offsets, -(-total // self.dp) * self.dp, group_index, late)
        self.buckets.append(bucket)
        for p in params:
            self.bucket_of[id(p)] = bucket

    # ---- backward side ---------------------------------------------------------------------------------
    def arm(self, params=None) -> None:
        """The next gradient accumulated into these parameters (all when None) is their last of the step."""
        self.armed |= set(self.bucket_of) if params is None else {id(p) for p in params}

    def _on_gradient(self, p: nn.Parameter) -> None:
        if id(p) not in self.armed:
            return  # a non-final microbatch: keep accumulating locally
        self.armed.discard(id(p))
        bucket = self.bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        first = bucket.params[0]
        flat = torch.zeros(bucket.numel, dtype=first.dtype, device=first.device)
        for p, offset in zip(bucket.params, bucket.offsets):
            if p.grad is not None:
                flat[offset:offset + p.numel()].copy_(p.grad.reshape(-1))
        bucket.flat, bucket.ready = flat, 0
        self.launch_times.append((bucket.index, time.perf_counter()))
        if self.dp == 1:
            bucket.shard, bucket.work = (flat if self.zero else None), None
            return
        if self.zero:
            bucket.shard = torch.empty(bucket.numel // self.dp, dtype=flat.dtype, device=flat.device)
            bucket.work = comm.reduce_scatter_async(bucket.shard, flat, self.group)
        else:
            bucket.work = comm.all_reduce_async(flat, self.group)

    def _finish(self, bucket: Bucket) -> None:
        if bucket.flat is None:  # never armed or never reached by backward: reduce what there is now
            self._launch(bucket)
        if bucket.work is not None:
            bucket.work.wait()
        if not self.zero:
            for p, offset in zip(bucket.params, bucket.offsets):
                summed = bucket.flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
        bucket.flat, bucket.work = None, None

    def wait(self) -> None:
        """Finish every hooked bucket's reduction (launching those backward did not complete)."""
        for bucket in self.buckets:
            if not bucket.late:
                self._finish(bucket)
        self.armed.clear()

    def reduce_late(self) -> None:
        """Reduce the late parameters' gradients (after their model-parallel sums)."""
        for bucket in self.buckets:
            if bucket.late:
                self._finish(bucket)

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's ZeRO-1 slice [lo, hi) of a bucket's flat gradient."""
        return slice_range(bucket, self.rank, self.dp)
