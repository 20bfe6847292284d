"""How the attention kernels move (rows, head dim) tiles between global memory and registers.

Two ways, one constexpr switch (TMA) so each kernel keeps one body:
  * pointers (the default): masked or unmasked `tl.load`/`tl.store` from a base pointer and a row stride;
    Triton pipelines these with cp.async on Ampere and Hopper;
  * TMA tensor descriptors (Hopper, sm_90): a descriptor made in the kernel (`tl.make_tensor_descriptor`)
    over one batch row's heads x S x HEAD_DIM elements, read and written in 1 x BLOCK x HEAD_DIM boxes by
    the Tensor Memory Accelerator. Rows past S come back as zeros and are not written, so the descriptor
    does the sequence-end masking itself. Each program writes its descriptors to a small global scratch
    (128 bytes each), which the host provides through `triton.set_allocator` (kernels/attention.py).

Both read and write the same elements, and the interpreter runs either (tests/kernels/test_attention_tma.py).
The compiled code differs (benchmarks/results/attention-ptxas-sm90/: over the configs that spill on
neither path, TMA needs 33 fewer registers per thread in the forward, 24 in dQ and 19 in dK/dV on
average, up to 11 and 44 more in a few dQ and dK/dV rows); which is faster is for a GPU to measure
(benchmarks/gpu_suite.sh, step attention-tma), so pointers stay the default.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rows_source(base, stride_h, n_heads, stride_s, seq_len, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                TMA: tl.constexpr):
    """What `load_rows` and `store_rows` take for the heads of one batch row: `base` (head 0, row 0;
    heads `stride_h` apart, rows `stride_s` apart) itself, or with TMA one tensor descriptor over its
    n_heads x seq_len x HEAD_DIM elements in 1 x BLOCK x HEAD_DIM boxes. One descriptor per tensor and
    program, however many heads the program visits: the dK/dV kernel's loop over a GQA group made (and
    wrote to scratch) two per head, and its 32 x 128 tile spilled 88-140 bytes at head dim 128; made
    once per program, it spills none (benchmarks/results/attention-ptxas-sm90/)."""
    if TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_heads, seq_len, HEAD_DIM], strides=[stride_h, stride_s, 1],
                                        block_shape=[1, BLOCK, HEAD_DIM])
    else:
        src = base
    return src


@triton.jit
def load_rows(src, head, start, stride_h, stride_s, seq_len, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASKED: tl.constexpr, TRANSPOSED: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of head `head` of `src` (`rows_source`) as a (BLOCK, HEAD_DIM) tile,
    or (HEAD_DIM, BLOCK) when TRANSPOSED. MASKED: rows past seq_len read as zeros (descriptors always do
    that); unmasked pointer loads are for tiles wholly inside S."""
    if TMA:
        tile = src.load([head, start, 0]).reshape(BLOCK, HEAD_DIM)
        if TRANSPOSED:
            tile = tl.trans(tile)
    else:
        offs = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = src + tl.cast(head, tl.int64) * stride_h  # 64-bit: any head stride, e.g. (B, H, S, D) inputs
        if TRANSPOSED:
            ptrs = rows + offs[None, :] * stride_s + offs_d[:, None]
            in_seq = (offs < seq_len)[None, :]
        else:
            ptrs = rows + offs[:, None] * stride_s + offs_d[None, :]
            in_seq = (offs < seq_len)[:, None]
        if MASKED:
            tile = tl.load(ptrs, mask=in_seq, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def store_rows(dst, head, start, tile, stride_h, stride_s, seq_len, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               TMA: tl.constexpr):
    """Write the (BLOCK, HEAD_DIM) `tile` over rows [start, start + BLOCK) of head `head` of `dst`
    (`rows_source`), rows past seq_len left untouched.

    The pointer path's row mask is `arange < seq_len - start`, not `start + arange < seq_len` as in
    `load_rows`: the compiler would merge the latter with the mask of the kernel's first load of the
    same rows and keep it live through every loop until this store. At head dim 128 those registers
    were what made the 32 x 128 dK/dV tile spill (benchmarks/results/attention-ptxas-sm90/).
    """
    if TMA:
        dst.store([head, start, 0], tile.reshape(1, BLOCK, HEAD_DIM))
    else:
        offs = tl.arange(0, BLOCK)
        rows = dst + tl.cast(head, tl.int64) * stride_h + (start + offs)[:, None] * stride_s
        tl.store(rows + tl.arange(0, HEAD_DIM)[None, :], tile, mask=(offs < seq_len - start)[:, None])
