"""Cross-entropy in Triton: one online-softmax pass per row, the gradient written during the forward,
vocab-parallel aware, and fused with the output projection so that the (N, V) logits never exist.

Public functions (the contract of docs/DESIGN.md):
    cross_entropy(logits (N,V), target (N,), *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                  reduction="mean", group=None)
    linear_cross_entropy(hidden (N,D), weight (V,D), target (N,), *, same options, group=None, chunk_size=None)
    cross_entropy_reference(...)  the plain PyTorch truth the tests compare against.

The loss of one row with target t, smoothing eps, z-loss coefficient z and lse = logsumexp(x) is
    loss = (1 - eps) * (lse - x_t) + eps * (lse - mean_j x_j) + z * lse**2
which is torch.nn.functional.cross_entropy(label_smoothing=eps) plus PaLM's z-loss (Chowdhery et al. 2022,
section 5). Rows whose target is ignore_index contribute 0 to the loss and 0 to the gradient; "mean"
divides by the number of non-ignored rows (1 when there is none, so an all-ignored batch gives 0, never NaN).
Losses are float32 whatever the logits dtype: every sum is accumulated in float32.

Vocab parallelism (Megatron-LM's vocab-parallel cross-entropy, Shoeybi et al. 2019): with `group`, rank r
holds the contiguous slice logits[:, r*Vr:(r+1)*Vr] (all ranks hold equal slices, Vr = V / world). Each
rank computes its partial row statistics (max, sum of exp, target logit, sum of logits); one MAX and one
SUM all-reduce combine them; the gradient of the local slice is then local. The returned loss is the same
on every rank, and backward assumes the upstream gradient is the same on every rank (it is, since the
loss is replicated). Without a group, or with a group of one rank, no collective is called.

Why the gradient is written during the forward (Liger-Kernel's choice) rather than by a backward kernel:
  * linear_cross_entropy must do it, since its logits chunks are gone by the backward; one kernel then
    serves both functions.
  * Traffic: the fused kernel reads a row, reads it again while it is still in L2 (one program per row;
    about 132 rows of 256 KB are in flight on an H100/H200, within its 50 MB L2), and writes its gradient.
    A separate backward reads the logits cold in the forward and cold again in the backward, after the
    rest of the forward has evicted them: one more pass over (N, V) from HBM.
  * Memory: autograd keeps the gradient (the logits' size) instead of the logits; the caller's logits
    can be freed as soon as the forward returns.
  The cost, computing a gradient nobody uses, is avoided: no gradient is computed when the logits (or
  hidden / weight) do not require one. This rests on the analysis above until a GPU measures it:
  benchmarks/cross_entropy.py times a separate-backward variant built from the same kernels.
By default cross_entropy writes the gradient into a new buffer, so its forward briefly holds one more
(N, V) tensor; `inplace=True` writes it over the logits instead (Liger-Kernel's trick: 1x the logits in
memory), for callers that never read their logits again, as the model's loss path. Autograd's version
counter then catches any other user that saved them. Ignored rows are never read: the kernels write
their zero gradient and stop, and linear_cross_entropy drops them before its matmuls.

The kernel calls are torch.library custom ops (flan::cross_entropy, flan::cross_entropy_,
flan::linear_cross_entropy, flan::scale_grad_) with fake implementations, so fake and meta tensors and
torch.compile trace through them; the vocab-parallel path (a process group) calls the host functions
directly, since an op cannot take a group. The Triton kernels are in kernels/cross_entropy_kernels.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

from kernels.cross_entropy_kernels import (_cross_entropy_fused_kernel, _cross_entropy_gradient_kernel,
                                           _cross_entropy_statistics_kernel, launch_config)

REDUCTIONS = ("mean", "sum", "none")
MIN_CHUNK_ROWS = 2048  # linear CE: matmuls of >= 2048 rows keep the tensor cores busy (Liger sizes by V/D)
CHUNK_BUDGET_BYTES = 2**30  # ... unless one chunk's logits would pass 1 GiB


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------
def _group_layout(group) -> tuple[int, int]:
    """(rank, world size) in the tensor-parallel group; (0, 1) without one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_arguments(fn: str, logits_like: torch.Tensor, n_rows: int, n_cols: int, target: torch.Tensor,
                     ignore_index: int, label_smoothing: float, z_loss: float, reduction: str, world: int) -> None:
    """Raise one clear error per misuse; `logits_like` is the (N, V) logits or the (V, D) weight."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction={reduction!r}; use one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing={label_smoothing}; it must lie in [0, 1]")
    if z_loss < 0.0:
        raise ValueError(f"{fn}: z_loss={z_loss}; the z-loss coefficient must be >= 0 (PaLM uses 1e-4)")
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"{fn}: target has shape {tuple(target.shape)}; expected ({n_rows},), one id per row")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: target dtype {target.dtype}; pass integer class ids (torch.long)")
    if target.device != logits_like.device:
        raise ValueError(f"{fn}: target is on {target.device} but the inputs on {logits_like.device}; move it")
    if n_cols == 0:
        raise ValueError(f"{fn}: the vocabulary slice is empty; each rank must hold at least one column")


def _check_target_values(fn: str, target: torch.Tensor, ignore_index: int, vocab_total: int) -> None:
    """One device sync per call: a wrong id would otherwise give a silently wrong loss (the kernels read
    the target column only when this rank holds it). Called where real values exist: inside the ops."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_total))
    if target.numel() and bool(bad.any()):
        raise ValueError(f"{fn}: target holds ids outside [0, {vocab_total}) that are not ignore_index="
                         f"{ignore_index}, e.g. {int(target[bad][0])}; fix the labels or the ignore_index")


def _combine_statistics(stats: torch.Tensor, group, world: int):
    """Global (lse, target logit, logit sum) per row from this rank's partial statistics.

    Two all-reduces across the group: MAX of the row max, then SUM of (sum of exp rescaled to the global
    max, target logit, logit sum) packed in one tensor. None at world size 1.
    """
    row_max, sum_exp, target_logit, logit_sum = stats
    if world > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        packed = torch.stack([sum_exp * torch.exp(row_max - global_max), target_logit, logit_sum])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        row_max, (sum_exp, target_logit, logit_sum) = global_max, packed
    return row_max + torch.log(sum_exp), target_logit, logit_sum


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, label_smoothing: float,
                          z_loss: float, group, row_scale: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Per-row float32 losses of `logits` (N, V_local), writing their gradients into `grad` when given.

    The gradient of row i is multiplied by row_scale[i] (row_scale of one element applies to every row);
    `grad` may be `logits` itself (the fused linear path overwrites its chunk). Arguments are not
    validated here: the public functions do it once.
    """
    n_rows, n_cols = logits.shape
    rank, world = _group_layout(group)
    stats = torch.empty(4, n_rows, device=logits.device, dtype=torch.float32)
    if n_rows == 0:
        return stats[0]
    block_v, num_warps = launch_config(n_cols, logits.device)
    scale_stride = 0 if row_scale.numel() == 1 else 1
    consts = dict(N_COLS=n_cols, BLOCK_V=block_v, SMOOTHING=label_smoothing > 0, num_warps=num_warps)
    if grad is not None and world == 1:
        _cross_entropy_fused_kernel[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), target, stats, row_scale, scale_stride, n_rows,
            ignore_index, label_smoothing, z_loss, **consts)
        lse, target_logit, logit_sum = _combine_statistics(stats, group, world)
    else:
        _cross_entropy_statistics_kernel[(n_rows,)](
            logits, logits.stride(0), target, stats, n_rows, rank * n_cols, ignore_index, **consts)
        lse, target_logit, logit_sum = _combine_statistics(stats, group, world)
        if grad is not None:
            _cross_entropy_gradient_kernel[(n_rows,)](
                logits, logits.stride(0), grad, grad.stride(0), target, lse, row_scale, scale_stride,
                rank * n_cols, n_cols * world, ignore_index, label_smoothing, z_loss, **consts)
    vocab_total = n_cols * world
    loss = (lse - (1.0 - label_smoothing) * target_logit - label_smoothing * logit_sum / vocab_total
            + z_loss * lse * lse)
    return torch.where(target == ignore_index, 0.0, loss)


def _reduce(row_losses: torch.Tensor, valid_count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    return total / valid_count.clamp(min=1) if reduction == "mean" else total


def _row_scale(valid_count: torch.Tensor, reduction: str) -> torch.Tensor:
    """The factor each row's gradient carries before the upstream gradient: 1/count for "mean", else 1."""
    if reduction == "mean":
        return (1.0 / valid_count.clamp(min=1).to(torch.float32)).reshape(1)
    return torch.ones(1, device=valid_count.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Custom ops (real work inside; the fakes give shapes only)
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("flan::cross_entropy", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
                      label_smoothing: float, z_loss: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses (N,) fp32, gradient (N, V), or an empty tensor without need_grad)."""
    _check_target_values("cross_entropy", target, ignore_index, logits.shape[1])
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    losses = cross_entropy_forward(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                   z_loss=z_loss, group=None, row_scale=row_scale, grad=grad if need_grad else None)
    return losses, grad


@_cross_entropy_op.register_fake
def _(logits, target, row_scale, ignore_index, label_smoothing, z_loss, need_grad):
    grad = torch.empty_like(logits) if need_grad else logits.new_empty(0)
    return logits.new_empty(logits.shape[0], dtype=torch.float32), grad


@torch.library.custom_op("flan::cross_entropy_", mutates_args=("logits",))
def _cross_entropy_inplace_op(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                              ignore_index: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Row losses; the gradient overwrites `logits` (each block is read before it is written)."""
    _check_target_values("cross_entropy", target, ignore_index, logits.shape[1])
    return cross_entropy_forward(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 z_loss=z_loss, group=None, row_scale=row_scale, grad=logits)


@_cross_entropy_inplace_op.register_fake
def _(logits, target, row_scale, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("flan::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> None:
    """grad *= grad_output in place (one value per row when per_row). The common loss.backward() passes
    exactly 1: that skips a full pass over the gradient (a host sync, cheaper than the pass)."""
    if per_row:
        grad.mul_(grad_output.reshape(-1, *([1] * (grad.dim() - 1))))
    elif not bool(grad_output == 1):
        grad.mul_(grad_output)


@_scale_grad_op.register_fake
def _(grad, grad_output, per_row):
    return None


def _scaled(grad: torch.Tensor | None, grad_output: torch.Tensor, per_row: bool = False) -> torch.Tensor | None:
    if grad is not None:
        _scale_grad_op(grad, grad_output, per_row)
    return grad


def _cross_entropy_rows(logits, target, row_scale, *, group, need_grad, inplace, **options):
    """(row losses, gradient or None): through the custom ops, or the host function under a group."""
    _, world = _group_layout(group)
    if world > 1:
        _check_target_values("cross_entropy", target, options["ignore_index"], logits.shape[1] * world)
        grad = (logits if inplace else torch.empty_like(logits)) if need_grad else None
        return cross_entropy_forward(logits, target, group=group, row_scale=row_scale, grad=grad, **options), grad
    args = (options["ignore_index"], options["label_smoothing"], options["z_loss"])
    if need_grad and inplace:
        return _cross_entropy_inplace_op(logits, target, row_scale, *args), logits
    losses, grad = _cross_entropy_op(logits, target, row_scale, *args, need_grad)
    return losses, grad if need_grad else None


class _CrossEntropy(torch.autograd.Function):
    """Forward: row losses and, if the logits need one, their gradient (kept for backward; with
    `inplace`, written over the logits). Backward: that gradient times the upstream gradient, in place
    (so backward runs once per forward)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, reduction, group, inplace):
        valid_count = (target != ignore_index).sum()
        row_losses, grad = _cross_entropy_rows(
            logits, target, _row_scale(valid_count, reduction), group=group, need_grad=ctx.needs_input_grad[0],
            inplace=inplace, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss)
        ctx.reduction = reduction
        if grad is not None:
            ctx.save_for_backward(grad)
        return _reduce(row_losses, valid_count, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return _scaled(grad, grad_output, ctx.reduction == "none"), None, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  group=None, inplace: bool = False) -> torch.Tensor:
    """Cross-entropy of `logits` (N, V) against `target` (N,), plus z_loss * logsumexp**2 per row.

    With `group`, `logits` is this rank's contiguous vocabulary slice (N, V / world) and `target` holds
    global ids; the loss (float32) is the unsharded one on every rank, and the gradient is that of the
    local slice. Differentiable in `logits`. inplace=True overwrites `logits` with its gradient during the
    forward (when it requires one), saving one (N, V) buffer: do not read the logits afterwards.
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits has shape {tuple(logits.shape)}; flatten it to (N, V) first")
    _, world = _group_layout(group)
    _check_arguments("cross_entropy", logits, logits.shape[0], logits.shape[1], target, ignore_index,
                     label_smoothing, z_loss, reduction, world)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels walk columns with unit stride
    return _CrossEntropy.apply(logits, target.contiguous(), ignore_index, float(label_smoothing), float(z_loss),
                               reduction, group, bool(inplace))


# ----------------------------------------------------------------------------------------------------
# Fused output projection + cross-entropy
# ----------------------------------------------------------------------------------------------------
def _auto_chunk_size(n_rows: int, n_cols: int, dim: int, element_size: int) -> int:
    """Rows per chunk: Liger-Kernel's sizing (a chunk's logits about as large as hidden, a power of two),
    raised to MIN_CHUNK_ROWS so that each matmul is big enough for the tensor cores, but never past
    CHUNK_BUDGET_BYTES of chunk logits, nor past the rows there are."""
    liger = triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(n_cols, dim)))
    budget = max(1, CHUNK_BUDGET_BYTES // (n_cols * element_size))
    return max(1, min(max(liger, MIN_CHUNK_ROWS), budget, n_rows))


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. On CUDA a bf16/fp16 GEMM with fp32 output (aten::addmm.dtype_out), so the
    running sum is never rounded to the input dtype; elsewhere (no such kernel on CPU) each chunk's
    product is rounded once and the sum stays fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _chunked_pass(hidden, weight, target, *, ignore_index, label_smoothing, z_loss, group, chunk_size, row_scale,
                  need_hidden_grad, need_weight_grad):
    """The chunk loop of linear_cross_entropy_pass (before the all-reduce of grad_h)."""
    n_rows = hidden.shape[0]
    need_grad = need_hidden_grad or need_weight_grad
    row_losses = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        hidden_chunk = hidden[start:stop]
        logits = hidden_chunk @ weight.t()  # (chunk, V_local): the only vocabulary-sized tensor
        scale = row_scale if row_scale.numel() == 1 else row_scale[start:stop]
        row_losses[start:stop] = cross_entropy_forward(
            logits, target[start:stop], ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            group=group, row_scale=scale, grad=logits if need_grad else None)
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[start:stop])
        if need_weight_grad:
            _accumulate_fp32(grad_weight, logits.t(), hidden_chunk)
    return row_losses, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def linear_cross_entropy_pass(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int,
                              label_smoothing: float, z_loss: float, group, chunk_size: int,
                              row_scale: torch.Tensor, need_hidden_grad: bool, need_weight_grad: bool):
    """(row losses, grad of hidden or None, grad of weight or None), one chunk of tokens at a time.

    1. Ignored rows (the prompt tokens of instruction tuning, often most of a batch) cost no matmul: the
       pass works on the rows that count (one host sync to count them) and gives the others zero loss
       and zero gradient.
    2. For each chunk: logits = h @ W^T (chunk x V_local, the input dtype, float32 accumulation in the
       matmul); the kernels turn them into row losses and overwrite them with d loss / d logits (times
       row_scale); then grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h, grad_W summed in fp32
       and rounded to the weight's dtype once at the end.
    3. Under `group` the weight is this rank's vocabulary slice; grad_h sums every rank's contribution
       with an all-reduce, so each rank returns the full gradient of the (replicated) hidden states.
    Autocast is off inside: the inputs' dtype is the compute dtype.
    """
    _, world = _group_layout(group)
    n_rows = hidden.shape[0]
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, group=group,
                   chunk_size=chunk_size, need_hidden_grad=need_hidden_grad, need_weight_grad=need_weight_grad)
    valid_rows = torch.nonzero(target != ignore_index).squeeze(1)
    compact = valid_rows.numel() < n_rows
    if compact:
        hidden, target = hidden.index_select(0, valid_rows), target.index_select(0, valid_rows)
        row_scale = row_scale if row_scale.numel() == 1 else row_scale.index_select(0, valid_rows)
    with torch.autocast(hidden.device.type, enabled=False):
        row_losses, grad_hidden, grad_weight = _chunked_pass(hidden, weight, target, row_scale=row_scale, **options)
    if compact:
        row_losses = row_losses.new_zeros(n_rows).index_copy_(0, valid_rows, row_losses)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.new_zeros(n_rows, grad_hidden.shape[1]).index_copy_(0, valid_rows, grad_hidden)
    if grad_hidden is not None and world > 1:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
    return row_losses, grad_hidden, grad_weight


@torch.library.custom_op("flan::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             row_scale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                             chunk_size: int, need_hidden_grad: bool, need_weight_grad: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row losses, grad of hidden, grad of weight), the grads empty when not needed (an op returns tensors)."""
    _check_target_values("linear_cross_entropy", target, ignore_index, weight.shape[0])
    losses, grad_hidden, grad_weight = linear_cross_entropy_pass(
        hidden, weight, target, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        group=None, chunk_size=chunk_size, row_scale=row_scale, need_hidden_grad=need_hidden_grad,
        need_weight_grad=need_weight_grad)
    # Distinct empty tensors: an op's outputs may not alias one another.
    return (losses, hidden.new_empty(0) if grad_hidden is None else grad_hidden,
            weight.new_empty(0) if grad_weight is None else grad_weight)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, target, row_scale, ignore_index, label_smoothing, z_loss, chunk_size, need_hidden_grad,
      need_weight_grad):
    return (hidden.new_empty(hidden.shape[0], dtype=torch.float32),
            torch.empty_like(hidden) if need_hidden_grad else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))


def _linear_rows(hidden, weight, target, row_scale, *, need_hidden_grad, need_weight_grad, group, **options):
    """linear_cross_entropy_pass through the custom op, or directly under a group (collectives inside)."""
    _, world = _group_layout(group)
    if world > 1:
        _check_target_values("linear_cross_entropy", target, options["ignore_index"], weight.shape[0] * world)
        return linear_cross_entropy_pass(hidden, weight, target, row_scale=row_scale, group=group,
                                         need_hidden_grad=need_hidden_grad, need_weight_grad=need_weight_grad,
                                         **options)
    losses, grad_hidden, grad_weight = _linear_cross_entropy_op(
        hidden, weight, target, row_scale, options["ignore_index"], options["label_smoothing"], options["z_loss"],
        options["chunk_size"], need_hidden_grad, need_weight_grad)
    return losses, grad_hidden if need_hidden_grad else None, grad_weight if need_weight_grad else None


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: row losses and, for "mean"/"sum", the gradients of hidden and weight (kept for backward).
    Backward: those gradients times the scalar upstream gradient. For "none" the upstream gradient differs
    per row and grad_W sums over rows, so backward recomputes the chunks with that gradient instead."""

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction, group, chunk_size):
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[:2]
        ctx.options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, group=group,
                           chunk_size=chunk_size)
        ctx.recompute = reduction == "none" and (need_hidden_grad or need_weight_grad)
        valid_count = (target != ignore_index).sum()
        in_forward = not ctx.recompute
        row_losses, grad_hidden, grad_weight = _linear_rows(
            hidden, weight, target, row_scale=_row_scale(valid_count, reduction),
            need_hidden_grad=need_hidden_grad and in_forward, need_weight_grad=need_weight_grad and in_forward,
            **ctx.options)
        if ctx.recompute:
            ctx.save_for_backward(hidden, weight, target)
        else:
            ctx.save_for_backward(grad_hidden, grad_weight)
        return _reduce(row_losses, valid_count, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.recompute:
            hidden, weight, target = ctx.saved_tensors
            _, grad_hidden, grad_weight = _linear_rows(
                hidden, weight, target, row_scale=grad_output.to(torch.float32).contiguous(),
                need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1], **ctx.options)
        else:
            grad_hidden, grad_weight = (_scaled(g, grad_output) for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean", group=None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, target, ...) without ever holding the (N, V) logits.

    hidden (N, D), weight (V, D) (under `group`: this rank's contiguous vocabulary slice (V / world, D),
    with hidden replicated on every rank, Megatron's layout). Works through `chunk_size` tokens at a time
    (default: see `_auto_chunk_size`), so the extra memory is O(chunk_size x V_local) plus
    the gradients of hidden and weight. Under `group` the gradient of hidden is already summed over the
    group: do not also wrap hidden in a copy-to-tensor-parallel-region op, or it would be summed twice.
    Differentiable in `hidden` and `weight`.
    """
    fn = "linear_cross_entropy"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (N, D) and "
                         f"(V, D) with the same D; flatten hidden to (N, D) first")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"{fn}: hidden is {hidden.dtype} on {hidden.device}, weight {weight.dtype} on "
                         f"{weight.device}; cast and move them to one dtype and device")
    _, world = _group_layout(group)
    _check_arguments(fn, weight, hidden.shape[0], weight.shape[0], target, ignore_index, label_smoothing, z_loss,
                     reduction, world)
    if chunk_size is None:
        chunk_size = _auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1], weight.element_size())
    elif chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size={chunk_size}; pass a positive number of rows, or None for automatic")
    return _LinearCrossEntropy.apply(hidden, weight, target.contiguous(), ignore_index, float(label_smoothing),
                                     float(z_loss), reduction, group, int(chunk_size))


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------
def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                            label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """The same loss in plain PyTorch (float32, or float64 for float64 logits) on unsharded logits:
    torch.nn.functional.cross_entropy plus z_loss * logsumexp**2 per non-ignored row, reduced alike."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    valid = target != ignore_index
    rows = F.cross_entropy(x, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(x, dim=-1) ** 2, 0.0)
    return _reduce(rows, valid.sum(), reduction)
