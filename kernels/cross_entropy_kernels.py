"""The cross-entropy Triton kernels: one program per row, looping over its columns in blocks of BLOCK_V.

Three kernels share the row helpers: `_cross_entropy_statistics_kernel` (partial row statistics, step 1
of the vocab-parallel path), `_cross_entropy_gradient_kernel` (the gradient given the global logsumexp,
step 3) and `_cross_entropy_fused_kernel` (both in one program, for an unsharded vocabulary). The math
and the reasons are in kernels/cross_entropy.py. Row offsets are 64-bit (row * stride passes 2**31 once
N x V does); column offsets stay 32-bit, as one row never holds 2**31 columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_statistics(row_ptr, n_cols, BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr):
    """Max, sum of exp(x - max) and sum of x over one row, in one pass (online softmax).

    The sum of x only enters the label-smoothing term: without smoothing it is not computed (0).

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
        if SMOOTHING:
            logit_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
        running_max = new_max
    return running_max, sum_exp, logit_sum


@triton.jit
def _write_row_gradient(row_ptr, grad_row_ptr, n_cols, local_target, lse, coef, z_loss, label_smoothing,
                        vocab_total, BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr):
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
        grad = softmax_weight * tl.exp(x - lse) - tl.where(cols == local_target, target_weight, 0.0)
        if SMOOTHING:
            grad -= uniform
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
                                     ignore_index, N_COLS: tl.constexpr, BLOCK_V: tl.constexpr,
                                     SMOOTHING: tl.constexpr):
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
    row_max, sum_exp, logit_sum = _row_statistics(row_ptr, N_COLS, BLOCK_V, SMOOTHING)
    target_logit = tl.load(row_ptr + local_target, mask=owns_target, other=0.0).to(tl.float32)
    _store_statistics(stats_ptr, n_rows, row, row_max, sum_exp, target_logit, logit_sum)


@triton.jit
def _cross_entropy_gradient_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr,
                                   lse_ptr, scale_ptr, scale_stride, vocab_start, vocab_total, ignore_index,
                                   label_smoothing, z_loss, N_COLS: tl.constexpr, BLOCK_V: tl.constexpr,
                                   SMOOTHING: tl.constexpr):
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
                        tl.load(scale_ptr + row * scale_stride), z_loss, label_smoothing, vocab_total, BLOCK_V,
                        SMOOTHING)


@triton.jit
def _cross_entropy_fused_kernel(logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr, stats_ptr,
                                scale_ptr, scale_stride, n_rows, ignore_index, label_smoothing, z_loss,
                                N_COLS: tl.constexpr, BLOCK_V: tl.constexpr, SMOOTHING: tl.constexpr):
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
    row_max, sum_exp, logit_sum = _row_statistics(row_ptr, N_COLS, BLOCK_V, SMOOTHING)
    target_logit = tl.load(row_ptr + local_target, mask=owns_target, other=0.0).to(tl.float32)
    _store_statistics(stats_ptr, n_rows, row, row_max, sum_exp, target_logit, logit_sum)
    lse = row_max + tl.log(sum_exp)
    _write_row_gradient(row_ptr, grad_row_ptr, N_COLS, local_target, lse, tl.load(scale_ptr + row * scale_stride),
                        z_loss, label_smoothing, N_COLS, BLOCK_V, SMOOTHING)



def launch_config(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `n_cols` columns.

    GPU: blocks of up to 32768 columns with 32 warps (Liger-Kernel's width): 32 values per thread per
    block, four 16-byte loads of bf16 in flight per thread, which a bandwidth-bound loop with one program
    per row needs to cover HBM latency; fewer, longer iterations also halve the loop's reductions.
    To be tuned with benchmarks/cross_entropy.py on a GPU.
    CPU (Triton's interpreter, whose cost is per block operation, nearly whatever the block's size):
    about four blocks per row, so that tests exercise the running-max loop and a partial last block,
    up to 16384 columns a block, so that wide rows stay fast.
    """
    if device.type == "cpu":
        return max(16, min(16384, triton.next_power_of_2(triton.cdiv(n_cols, 4)))), 1
    return min(32768, triton.next_power_of_2(n_cols)), 32
