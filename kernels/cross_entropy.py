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
Unlike Liger-Kernel, cross_entropy writes the gradient into a new buffer rather than over the logits
(a caller who keeps its logits would find them overwritten), so its forward briefly holds one more
(N, V) tensor; linear_cross_entropy is the memory-lean path. Ignored rows are never read: the kernels
write their zero gradient and stop, and linear_cross_entropy drops them before its matmuls.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none")

# Row statistics, one float32 vector each, in this order in the (4, N) statistics tensor.
_MAX, _SUM_EXP, _TARGET_LOGIT, _LOGIT_SUM = range(4)


# ----------------------------------------------------------------------------------------------------
# Triton kernels: one program per row, looping over the row's columns in blocks of BLOCK_V.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _row_statistics(row_ptr, n_cols, BLOCK_V: tl.constexpr):
    """Max, sum of exp(x - max) and sum of x over one row, in one pass (online softmax).

    Milakov & Gimelshein 2018: when a block raises the running max from m to m', the running sum of
    exponentials is rescaled by exp(m - m') before the block's own exp(x - m') are added.
    """
    running_max = float("-inf")
    sum_exp = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # exp(-inf - new_max) = 0 drops the masked tail; the first block always holds a real column.
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        running_max = new_max
    return running_max, sum_exp, logit_sum


@triton.jit
def _write_row_gradient(row_ptr, grad_row_ptr, n_cols, local_target, lse, coef, z_loss, label_smoothing,
                        vocab_total, BLOCK_V: tl.constexpr):
    """grad_j = coef * ((1 + 2 z lse) * softmax_j - (1 - eps) * [j == t] - eps / V), over one row.

    d lse / d x_j = softmax_j, so the z-loss term z * lse**2 adds 2 z lse softmax_j; the smoothing term
    eps * (lse - mean x) adds eps * (softmax_j - 1/V). `grad_row_ptr` may equal `row_ptr`: each block is
    read before it is overwritten. `local_target` outside [0, n_cols) (another rank's column) matches
    no column. Ignored rows never come here (see _write_zero_row).
    """
    softmax_weight = coef * (1.0 + 2.0 * z_loss * lse)
    target_weight = coef * (1.0 - label_smoothing)
    uniform = coef * label_smoothing / vocab_total
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = softmax_weight * tl.exp(x - lse) - uniform - tl.where(cols == local_target, target_weight, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_zero_row(grad_row_ptr, n_cols, BLOCK_V: tl.constexpr):
    """The gradient of an ignored row: zeros, written without reading the row."""
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _row_setup(target_ptr, logits_ptr, logits_row_stride, vocab_start, n_cols, ignore_index):
    """This program's row: pointer to its logits, its local target column, and whether it is ignored."""
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride overflows int32 past 2**31 elements
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    local_target = target - vocab_start
    owns_target = (local_target >= 0) & (local_target < n_cols)  # read only on rows that are not ignored
    local_target = tl.where(owns_target, local_target, -1)
    return row, logits_ptr + row * logits_row_stride, local_target, owns_target, ignored


@triton.jit
def _store_statistics(stats_ptr, n_rows, row, row_max, sum_exp, target_logit, logit_sum):
    tl.store(stats_ptr + 0 * n_rows + row, row_max)
    tl.store(stats_ptr + 1 * n_rows + row, sum_exp)
    tl.store(stats_ptr + 2 * n_rows + row, target_logit)
    tl.store(stats_ptr + 3 * n_rows + row, logit_sum)


@triton.jit
def _cross_entropy_statistics_kernel(logits_ptr, logits_row_stride, target_ptr, stats_ptr, n_rows, vocab_start,
                                     ignore_index, N_COLS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Partial statistics of each row over this rank's columns (step 1 of the vocab-parallel path).

    logits_ptr: (n_rows, N_COLS) logits, unit column stride, row stride `logits_row_stride`.
    target_ptr: (n_rows,) int64 global vocabulary ids; vocab_start: global id of local column 0.
    stats_ptr:  (4, n_rows) float32 out: row max, sum of exp(x - max), target logit (0 unless this
                rank holds it), sum of logits.
    N_COLS is a compile-time constant: the vocabulary is fixed for a run, so it costs one compilation,
    and constant loop bounds also keep Triton's interpreter working under NumPy >= 2.4 (which no longer
    converts its one-element arrays, the interpreter's runtime scalars, to a Python int in range()).
    """
    row, row_ptr, local_target, owns_target, ignored = _row_setup(target_ptr, logits_ptr, logits_row_stride,
                                                                  vocab_start, N_COLS, ignore_index)
    if ignored:  # never read: instruction tuning ignores most tokens (the prompts)
        _store_statistics(stats_ptr, n_rows, row, 0.0, 1.0, 0.0, 0.0)  # lse = 0, finite; the loss is masked
        return
    row_max, sum_exp, logit_sum = _row_statistics(row_ptr, N_COLS, BLOCK_V)
    target_logit = tl.load(row_ptr + local_target, mask=owns_target, other=0.0).to(tl.float32)
    _store_statistics(stats_ptr, n_rows, row, row_max, sum_exp, target_logit, logit_sum)


@triton.jit
def _cross_entropy_gradient_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr,
                                   lse_ptr, scale_ptr, scale_stride, vocab_start, vocab_total, ignore_index,
                                   label_smoothing, z_loss, N_COLS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Gradient of each row's loss over this rank's columns, given the global logsumexp (step 3).

    lse_ptr: (n_rows,) float32 global logsumexp. scale_ptr: float32 per-row factor (1/count for "mean"),
    read at row * scale_stride (stride 0 broadcasts one value). grad_ptr may equal logits_ptr.
    """
    row, row_ptr, local_target, owns_target, ignored = _row_setup(target_ptr, logits_ptr, logits_row_stride,
                                                                  vocab_start, N_COLS, ignore_index)
    grad_row_ptr = grad_ptr + row * grad_row_stride
    if ignored:
        _write_zero_row(grad_row_ptr, N_COLS, BLOCK_V)
        return
    _write_row_gradient(row_ptr, grad_row_ptr, N_COLS, local_target, tl.load(lse_ptr + row),
                        tl.load(scale_ptr + row * scale_stride), z_loss, label_smoothing, vocab_total, BLOCK_V)


@triton.jit
def _cross_entropy_fused_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr, stats_ptr,
                                scale_ptr, scale_stride, n_rows, ignore_index, label_smoothing, z_loss,
                                N_COLS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Statistics and gradient of each row in one program, for an unsharded vocabulary.

    The same arguments as the two kernels above (vocab_start = 0, vocab_total = N_COLS). The second pass
    over the row follows the first within the program, so it mostly hits L2.
    """
    row, row_ptr, local_target, owns_target, ignored = _row_setup(target_ptr, logits_ptr, logits_row_stride,
                                                                  0, N_COLS, ignore_index)
    grad_row_ptr = grad_ptr + row * grad_row_stride
    if ignored:
        _store_statistics(stats_ptr, n_rows, row, 0.0, 1.0, 0.0, 0.0)
        _write_zero_row(grad_row_ptr, N_COLS, BLOCK_V)
        return
    row_max, sum_exp, logit_sum = _row_statistics(row_ptr, N_COLS, BLOCK_V)
    target_logit = tl.load(row_ptr + local_target, mask=owns_target, other=0.0).to(tl.float32)
    _store_statistics(stats_ptr, n_rows, row, row_max, sum_exp, target_logit, logit_sum)
    lse = row_max + tl.log(sum_exp)
    _write_row_gradient(row_ptr, grad_row_ptr, N_COLS, local_target, lse, tl.load(scale_ptr + row * scale_stride),
                        z_loss, label_smoothing, N_COLS, BLOCK_V)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------
def _launch_config(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `n_cols` columns.

    GPU: blocks of up to 16384 columns with 32 warps, 16 float32 values per thread per block: two 16-byte
    loads of bf16 each, enough bytes in flight for a bandwidth-bound loop with one program per row
    (Liger-Kernel uses 32768 / 32). To be tuned with benchmarks/cross_entropy.py on a GPU.
    CPU (Triton's interpreter, whose cost is per block operation, nearly whatever the block's size):
    about four blocks per row, so that tests exercise the running-max loop and a partial last block,
    up to 16384 columns a block, so that wide rows stay fast.
    """
    if device.type == "cpu":
        return max(16, min(16384, triton.next_power_of_2(triton.cdiv(n_cols, 4)))), 1
    return min(16384, triton.next_power_of_2(n_cols)), 32


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
    # One device sync per call: a wrong id would otherwise give a silently wrong loss (the kernels read
    # the target column only when this rank holds it).
    vocab_total = n_cols * world
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_total))
    if n_rows and bool(bad.any()):
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
    block_v, num_warps = _launch_config(n_cols, logits.device)
    scale_stride = 0 if row_scale.numel() == 1 else 1
    if grad is not None and world == 1:
        _cross_entropy_fused_kernel[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), target, stats, row_scale, scale_stride, n_rows,
            ignore_index, label_smoothing, z_loss, N_COLS=n_cols, BLOCK_V=block_v, num_warps=num_warps)
        lse, target_logit, logit_sum = _combine_statistics(stats, group, world)
    else:
        _cross_entropy_statistics_kernel[(n_rows,)](
            logits, logits.stride(0), target, stats, n_rows, rank * n_cols, ignore_index,
            N_COLS=n_cols, BLOCK_V=block_v, num_warps=num_warps)
        lse, target_logit, logit_sum = _combine_statistics(stats, group, world)
        if grad is not None:
            _cross_entropy_gradient_kernel[(n_rows,)](
                logits, logits.stride(0), grad, grad.stride(0), target, lse, row_scale, scale_stride,
                rank * n_cols, n_cols * world, ignore_index, label_smoothing, z_loss,
                N_COLS=n_cols, BLOCK_V=block_v, num_warps=num_warps)
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


def cross_entropy_backward(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """The (N, V) gradient times the upstream gradient, in place: a scalar, or one value per row for "none"."""
    return grad.mul_(grad_output.reshape(-1, 1) if reduction == "none" else grad_output)


class _CrossEntropy(torch.autograd.Function):
    """Forward: row losses and, if the logits need one, their gradient (kept for backward).
    Backward: that gradient times the upstream gradient, in place (so backward runs once per forward)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, z_loss, reduction, group):
        valid_count = (target != ignore_index).sum()
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        row_losses = cross_entropy_forward(logits, target, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, z_loss=z_loss, group=group,
                                           row_scale=_row_scale(valid_count, reduction), grad=grad)
        ctx.reduction = reduction
        if grad is not None:
            ctx.save_for_backward(grad)
        return _reduce(row_losses, valid_count, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # The common case loss.backward() passes exactly 1: skip a full pass over the (N, V) gradient.
        if ctx.reduction == "none" or not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad = cross_entropy_backward(grad, grad_output, ctx.reduction)
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                  group=None) -> torch.Tensor:
    """Cross-entropy of `logits` (N, V) against `target` (N,), plus z_loss * logsumexp**2 per row.

    With `group`, `logits` is this rank's contiguous vocabulary slice (N, V / world) and `target` holds
    global ids; the loss (float32) is the unsharded one on every rank, and the gradient is that of the
    local slice. Differentiable in `logits`.
    """
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits has shape {tuple(logits.shape)}; flatten it to (N, V) first")
    _, world = _group_layout(group)
    _check_arguments("cross_entropy", logits, logits.shape[0], logits.shape[1], target, ignore_index,
                     label_smoothing, z_loss, reduction, world)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels walk columns with unit stride
    return _CrossEntropy.apply(logits, target.contiguous(), ignore_index, float(label_smoothing), float(z_loss),
                               reduction, group)


# ----------------------------------------------------------------------------------------------------
# Fused output projection + cross-entropy
# ----------------------------------------------------------------------------------------------------
def _auto_chunk_size(n_rows: int, n_cols: int, dim: int) -> int:
    """Rows per chunk such that a chunk's logits (rows x V_local) hold about as many values as hidden
    (N x D): the extra memory is then of the order of the inputs whatever V. A power of two, for matmul
    shapes (the sizing Liger-Kernel's fused linear cross-entropy uses, so memory compares like for like)."""
    chunks = triton.cdiv(n_cols, dim)
    return triton.next_power_of_2(triton.cdiv(n_rows, chunks))


def _chunked_pass(hidden, weight, target, *, ignore_index, label_smoothing, z_loss, group, chunk_size, row_scale,
                  need_hidden_grad, need_weight_grad):
    """The chunk loop of linear_cross_entropy_pass (before the all-reduce of grad_h)."""
    n_rows = hidden.shape[0]
    need_grad = need_hidden_grad or need_weight_grad
    row_losses = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight) if need_weight_grad else None
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
            grad_weight.addmm_(logits.t(), hidden_chunk)
    return row_losses, grad_hidden, grad_weight


def linear_cross_entropy_pass(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int,
                              label_smoothing: float, z_loss: float, group, chunk_size: int,
                              row_scale: torch.Tensor, need_hidden_grad: bool, need_weight_grad: bool):
    """(row losses, grad of hidden or None, grad of weight or None), one chunk of tokens at a time.

    1. Ignored rows (the prompt tokens of instruction tuning, often most of a batch) cost no matmul: the
       pass works on the rows that count (one host sync to count them) and gives the others zero loss
       and zero gradient.
    2. For each chunk: logits = h @ W^T (chunk x V_local, the input dtype, float32 accumulation in the
       matmul); the kernels turn them into row losses and overwrite them with d loss / d logits (times
       row_scale); then grad_h[chunk] = dlogits @ W and grad_W += dlogits^T @ h (one rounding per chunk).
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
        row_losses, grad_hidden, grad_weight = linear_cross_entropy_pass(
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
            _, grad_hidden, grad_weight = linear_cross_entropy_pass(
                hidden, weight, target, row_scale=grad_output.to(torch.float32).contiguous(),
                need_hidden_grad=ctx.needs_input_grad[0], need_weight_grad=ctx.needs_input_grad[1], **ctx.options)
        else:
            grad_hidden, grad_weight = ctx.saved_tensors
            grad_hidden = None if grad_hidden is None else grad_hidden.mul_(grad_output)
            grad_weight = None if grad_weight is None else grad_weight.mul_(grad_output)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean", group=None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, target, ...) without ever holding the (N, V) logits.

    hidden (N, D), weight (V, D) (under `group`: this rank's contiguous vocabulary slice (V / world, D),
    with hidden replicated on every rank, Megatron's layout). Works through `chunk_size` tokens at a time
    (default: chunk logits about the size of hidden), so the extra memory is O(chunk_size x V_local) plus
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
        chunk_size = _auto_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])
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
