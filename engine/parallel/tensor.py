"""Megatron tensor parallelism, with optional sequence parallelism, applied to the plain model from one plan.

Each block becomes two tensor-parallel regions (Shoeybi et al. 2019, figure 3): the norm before attention
(and before the MLP) hands its output to column-parallel linears (q, k, v / gate, up: each rank computes its
heads or its slice of d_ff), and a row-parallel linear (o / down) sums the ranks' partial outputs. The entry
and the exit are the only communication:
    tensor parallel      entry f: identity forward, all-reduce backward;  exit g: all-reduce forward
    + sequence parallel  entry: all-gather along S;                       exit: reduce-scatter along S
With sequence parallelism (Korthikanti et al. 2022) the residual stream and the norms between the regions
hold (B, S/tp, d): each rank its contiguous chunk of the sequence. Attention always sees the whole sequence
(after the entry) for its local heads, so rotary positions and segment masks need no change.

The vocabulary is split in contiguous slices: the embedding looks up the ids of its slice and sums
(or reduce-scatters) over ranks; the output head computes its slice of the logits and a vocab-parallel
cross-entropy. Tied embeddings share the one sharded weight. Weights are sliced from the single-device
model, so a tensor-parallel run starts from exactly the same weights; `apply_tensor_parallel` returns what it
split (`TensorParallelShards`: the dimension of every sharded tensor, the gains with partial gradients), which
the layout (engine/parallel/layout.py) keeps, and `planned_shard_dim` gives the same dimensions offline.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.batch import IGNORE_INDEX
from engine.config import layout_problem
from engine.model import OutputHead, RMSNorm, Transformer
from engine.parallel import comm
from engine.parallel.mesh import Mesh

# Module name pattern -> how the module is split. Every Linear, Embedding, RMSNorm and OutputHead of the model
# must match one entry (apply_tensor_parallel checks), so a new layer cannot silently stay replicated.
TP_PLAN: dict[str, str] = {
    "tok_embeddings": "vocab_embedding",
    "layers.*.attn_norm": "column_input",
    "layers.*.attn.wq": "column",  # rows grouped by query head: a contiguous slice = whole heads
    "layers.*.attn.wk": "column",  # by key/value head
    "layers.*.attn.wv": "column",
    "layers.*.attn.wo": "row",
    "layers.*.mlp_norm": "column_input",
    "layers.*.mlp.w_gate": "column",
    "layers.*.mlp.w_up": "column",
    "layers.*.mlp.w_down": "row",
    "norm": "column_input",
    "output": "vocab_output",
}
_PLANNED_TYPES = (nn.Linear, nn.Embedding, RMSNorm, OutputHead)


def shard(full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous equal slice of `full` along `dim` (a copy)."""
    return full.detach().chunk(world, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    """y = x W_r^T: this rank's slice of the output features. No communication: the norm before it has already
    entered the region (one entry shared by q, k and v, or by gate and up)."""

    shard_dim = 0

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, where x_r is this rank's slice of the input features; the sum is g
    (all-reduce) or, with sequence parallelism, a reduce-scatter that leaves this rank's sequence chunk."""

    shard_dim = 1

    def __init__(self, weight: torch.Tensor, group, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            return comm.reduce_scatter_sequence(partial, self.group)
        return comm.reduce_from_region(partial, self.group)


class ColumnInputNorm(RMSNorm):
    """RMSNorm (on this rank's sequence chunk under sequence parallelism), then the entry to the region its
    output feeds: f, or the all-gather along the sequence. Its weight is replicated; under sequence parallelism
    each rank's gradient covers only its chunk, so the layout sums them (`TensorParallelShards.partial_grads`)."""

    shard_dim = None

    def __init__(self, norm: RMSNorm, group, sequence_parallel: bool):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.sequence_parallel:
            return comm.gather_sequence(y, self.group)
        return comm.copy_to_region(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + V/tp) of the embedding. Ids outside the slice look up zeros; the sum over
    ranks (g, or a reduce-scatter along the sequence) gives every id its row."""

    shard_dim = 0

    def __init__(self, weight: torch.Tensor, vocab_start: int, group, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.group, self.sequence_parallel = vocab_start, group, sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tp = comm.group_size(self.group)
        if self.sequence_parallel and tokens.shape[1] % tp:
            raise ValueError(f"sequence parallelism: sequence length {tokens.shape[1]} does not divide by "
                             f"parallel.tp={tp}; pick data.seq_len (or input_len/target_len) divisible by tp, "
                             "or run with --parallel.sp=false")
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_sequence(rows, self.group)
        return comm.reduce_from_region(rows, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of logits whose vocabulary is split over the group (Megatron's layout).

    Forward: with m the global row max (all-reduce MAX), Z = sum over all ranks of exp(x - m) (all-reduce SUM)
    and x_t the target logit (held by one rank; all-reduce SUM), loss = log Z - (x_t - m); 0 where ignored.
    Backward: d loss / d x_j = softmax_j - [j == t], computed on the local slice only; no communication.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        n_local = logits.shape[-1]
        row_max = comm.all_reduce(logits.max(dim=-1).values, group, op="max")
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = comm.all_reduce(exp.sum(dim=-1), group)
        local_target = target - vocab_start
        here = (local_target >= 0) & (local_target < n_local)
        local_target = local_target.clamp(0, n_local - 1)
        target_logit = shifted.gather(1, local_target[:, None]).squeeze(1) * here
        target_logit = comm.all_reduce(target_logit, group)
        valid = target != IGNORE_INDEX
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local_target, here, valid)
        return (sum_exp.log() - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, here, valid = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= here.to(grad.dtype)
        return grad * (grad_loss * valid)[:, None], None, None, None


class VocabParallelOutputHead(nn.Module):
    """The vocab-parallel twin of model.OutputHead: same forward (full logits) and loss API."""

    shard_dim = 0

    def __init__(self, weight: torch.Tensor, vocab_start: int, group, impl: str):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.group, self.impl = vocab_start, group, impl

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits (..., V) on every rank: this rank's slice, all-gathered along the vocabulary."""
        return comm.gather_replicated(F.linear(h, self.weight), self.group, dim=-1)

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the non-ignored labels, the same on every rank; "sum" or "mean" as OutputHead."""
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        logits = F.linear(h, self.weight)  # (N, V / tp)
        if self.impl in ("triton", "fused"):
            # linear_cross_entropy sums grad_hidden over the group itself, and the entry before this head (f or the
            # sequence all-gather) would sum it again: under tensor parallelism "fused" takes the logits kernel.
            from kernels.cross_entropy import cross_entropy

            return cross_entropy(logits, labels, reduction=reduction, group=self.group)
        losses = _VocabParallelCrossEntropy.apply(logits.float(), labels, self.vocab_start, self.group)
        if reduction == "sum":
            return losses.sum()
        return losses.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def plan_kind(name: str) -> str | None:
    """The TP_PLAN kind of module `name`, or None when no pattern matches."""
    for pattern, kind in TP_PLAN.items():
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


def _tensor_parallel_twin(kind: str, module: nn.Module, mesh: Mesh, sequence_parallel: bool) -> nn.Module:
    rank, tp, group = mesh.tp_rank, mesh.tp, mesh.tp_group
    if kind == "column":
        return ColumnParallelLinear(shard(module.weight, 0, rank, tp))
    if kind == "row":
        return RowParallelLinear(shard(module.weight, 1, rank, tp), group, sequence_parallel)
    if kind == "column_input":
        return ColumnInputNorm(module, group, sequence_parallel)
    vocab_start = rank * (module.weight.shape[0] // tp)
    if kind == "vocab_embedding":
        return VocabParallelEmbedding(shard(module.weight, 0, rank, tp), vocab_start, group, sequence_parallel)
    if kind == "vocab_output":
        return VocabParallelOutputHead(shard(module.weight, 0, rank, tp), vocab_start, group, module.impl)
    raise ValueError(f"engine/parallel/tensor.py: TP_PLAN kind {kind!r} is unknown; use column, row, "
                     "column_input, vocab_embedding or vocab_output")


_KIND_CLASSES = {"column": ColumnParallelLinear, "row": RowParallelLinear, "column_input": ColumnInputNorm,
                 "vocab_embedding": VocabParallelEmbedding, "vocab_output": VocabParallelOutputHead}


def planned_shard_dim(param_name: str) -> int | None:
    """The dimension tensor parallelism splits a single-device parameter along (None: replicated), from the
    plan alone (the planner and the offline checkpoint converter)."""
    kind = plan_kind(param_name.rsplit(".", 1)[0])
    return None if kind is None else _KIND_CLASSES[kind].shard_dim


@dataclass
class TensorParallelShards:
    """What apply_tensor_parallel split: how to gather each sharded tensor and which gradients need a sum."""

    dims: dict[str, int] = field(default_factory=dict)
    """State-dict name -> the dimension along which that tensor is split over the tensor-parallel group."""
    partial_grads: list[nn.Parameter] = field(default_factory=list)
    """Replicated parameters whose gradient each rank holds only a part of (norms under sequence parallelism)."""


@torch.no_grad()
def apply_tensor_parallel(model: Transformer, mesh: Mesh, sequence_parallel: bool) -> TensorParallelShards:
    """Swap the plain modules for their tensor-parallel twins in place, slicing the current weights."""
    problem = layout_problem(model.cfg, mesh.tp)
    if problem:
        raise ValueError(f"tensor parallelism: {problem[0]}={mesh.tp}: {problem[1]}")
    tied = (model.tok_embeddings is not None and model.output is not None
            and model.output.weight is model.tok_embeddings.weight)
    planned = []
    for name, module in model.named_modules():
        kind = plan_kind(name)
        if kind is None and isinstance(module, _PLANNED_TYPES):
            raise ValueError(f"engine/parallel/tensor.py: module {name!r} ({type(module).__name__}) has no entry "
                             "in TP_PLAN; add its pattern with a kind (column, row, column_input, ...)")
        if kind is not None:
            planned.append((name, kind, module))
    shards = TensorParallelShards()
    for name, kind, module in planned:
        twin = _tensor_parallel_twin(kind, module, mesh, sequence_parallel)
        model.set_submodule(name, twin)
        if twin.shard_dim is not None:
            shards.dims[f"{name}.weight"] = twin.shard_dim
        if kind == "column_input" and sequence_parallel:
            shards.partial_grads.append(twin.weight)
    if tied:  # one sharded weight for both: the same slicing serves both
        model.output.weight = model.tok_embeddings.weight
    return shards
