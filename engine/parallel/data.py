"""Data parallelism: gradients summed over the dp replicas in buckets launched from backward hooks, and ZeRO-1.

    sync = GradientSync(model, mesh.dp_group, bucket_mb=25, zero=False, late=[...])
    sync.arm()                 # before the last microbatch's backward: earlier microbatches only accumulate
    loss.backward()            # each bucket's all-reduce starts as soon as its last gradient is accumulated
    sync.wait()                # then model-parallel fix-ups of the `late` parameters, then
    sync.reduce_late()
    optimizer = ZeroAdamW(sync, cfg.optim)   # zero=True: AdamW on this rank's 1/dp of every bucket

Buckets hold parameters in reverse registration order (roughly the order backward finishes them) up to
bucket_mb MiB each, never mixing optimizer parameter groups, so that a ZeRO shard of a bucket has one weight
decay. Gradients are summed, not averaged: the training loop divides every microbatch's summed loss by the
global batch's target-token count, so each replica's gradient is already its share of the global one.
`late` parameters (tied embeddings across pipeline stages, sequence-parallel norm gains) get a model-parallel
sum first, so they are reduced after `wait`. With ZeRO-1 (Rajbhandari et al. 2020) a bucket is
reduce-scattered instead of all-reduced, each rank steps the optimizer state of its slice only, and the
updated slices are all-gathered back into the parameters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import OptimConfig
from engine.optim import param_groups


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


@dataclass
class SyncCounters:
    """What the reductions did: bytes this rank sent (ring algorithm: an all-reduce sends 2(dp-1)/dp of the
    buffer, a reduce-scatter or an all-gather (dp-1)/dp) and when each bucket was launched."""

    sent_bytes: int = 0
    launches: list[tuple[int, float]] = field(default_factory=list)
    """(bucket index, time.perf_counter()) in launch order."""


class GradientSync:
    def __init__(self, model: nn.Module, group, *, bucket_mb: float, zero: bool, late: list[nn.Parameter],
                 weight_decay: float = 0.0):
        self.group = group
        self.dp = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.zero = zero
        self.counters = SyncCounters()
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
        self.armed |= {id(p) for p in (params if params is not None else self.bucket_of_params())}

    def bucket_of_params(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

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
        self.counters.launches.append((bucket.index, time.perf_counter()))
        nbytes = flat.numel() * flat.element_size()
        if self.dp == 1:
            bucket.shard, bucket.work = (flat if self.zero else None), None
            return
        if self.zero:
            bucket.shard = torch.empty(bucket.numel // self.dp, dtype=flat.dtype, device=flat.device)
            bucket.work = dist.reduce_scatter(bucket.shard, list(flat.chunk(self.dp)), group=self.group,
                                              async_op=True)
            self.counters.sent_bytes += nbytes * (self.dp - 1) // self.dp
        else:
            bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)
            self.counters.sent_bytes += 2 * nbytes * (self.dp - 1) // self.dp

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

    # ---- ZeRO-1 views ----------------------------------------------------------------------------------
    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        size = bucket.numel // self.dp
        return self.rank * size, (self.rank + 1) * size

    def shard_square_sum(self, counted: set[int]) -> torch.Tensor:
        """Sum of squares of this rank's reduced gradient slices, over the elements of `counted` parameters."""
        total = torch.zeros((), dtype=torch.float32, device=self.buckets[0].params[0].device)
        for bucket in self.buckets:
            lo, hi = self.shard_range(bucket)
            for p, offset in zip(bucket.params, bucket.offsets):
                start, end = max(lo, offset), min(hi, offset + p.numel())
                if id(p) in counted and start < end:
                    total += bucket.shard[start - lo:end - lo].float().pow(2).sum()
        return total

    def shard_grads(self) -> list[torch.Tensor]:
        return [b.shard for b in self.buckets if b.shard is not None]

    def gather_gradients(self) -> None:
        """Put the full reduced gradients back into p.grad (collective; for inspection, ZeRO-1 steps without)."""
        for bucket in self.buckets:
            full = _all_gather_flat(bucket.shard, self.group, self.dp)
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad = full[offset:offset + p.numel()].view_as(p).clone()


def _all_gather_flat(shard: torch.Tensor, group, dp: int) -> torch.Tensor:
    if dp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(dp)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


class ZeroAdamW:
    """AdamW whose state covers only this data-parallel rank's slice of every gradient bucket (ZeRO stage 1).

    The slices are flat fp32 copies of the parameters; AdamW is elementwise, so stepping a flat slice is the
    same arithmetic as stepping the parameters it covers. After the step every rank all-gathers the updated
    slices into its parameters. Quacks like a torch optimizer for the loop: param_groups, step, zero_grad.
    """

    def __init__(self, sync: GradientSync, o: OptimConfig):
        if o.name != "adamw":
            raise ValueError(f"parallel.zero=1 shards AdamW's elementwise state; optim.name={o.name!r} factors "
                             "whole matrices and cannot be split flat; use optim.name=adamw or parallel.zero=0")
        self.sync = sync
        self.shards: list[nn.Parameter] = []
        groups = [{"params": [], "weight_decay": o.weight_decay}, {"params": [], "weight_decay": 0.0}]
        for bucket in sync.buckets:
            flat = torch.zeros(bucket.numel, dtype=bucket.params[0].dtype, device=bucket.params[0].device)
            for p, offset in zip(bucket.params, bucket.offsets):
                flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            lo, hi = sync.shard_range(bucket)
            shard = nn.Parameter(flat[lo:hi].clone())
            self.shards.append(shard)
            groups[bucket.group_index]["params"].append(shard)
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2),
                                       eps=o.eps, foreach=False)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def state_bytes(self) -> int:
        """Bytes of optimizer state (moments and step counters) this rank holds."""
        return sum(t.numel() * t.element_size() for s in self.inner.state.values() for t in s.values()
                   if torch.is_tensor(t))

    @torch.no_grad()
    def step(self) -> None:
        for shard, bucket in zip(self.shards, self.sync.buckets):
            shard.grad = bucket.shard
        self.inner.step()
        for shard, bucket in zip(self.shards, self.sync.buckets):
            full = _all_gather_flat(shard.detach(), self.sync.group, self.sync.dp)
            if self.sync.dp > 1:
                nbytes = full.numel() * full.element_size()
                self.sync.counters.sent_bytes += nbytes * (self.sync.dp - 1) // self.sync.dp
            for p, offset in zip(bucket.params, bucket.offsets):
                p.copy_(full[offset:offset + p.numel()].view_as(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for shard in self.shards:
            shard.grad = None
        for bucket in self.sync.buckets:
            bucket.shard = None
            for p in bucket.params:
                p.grad = None
