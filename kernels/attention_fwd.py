"""The flash-attention forward kernel: one program per query tile, an online softmax over key tiles.

FlashAttention-2 (Dao, 2023), as in Triton's fused-attention tutorial: scores stay raw until the row max
is taken, then one fused multiply-add `s * qk_scale - m` feeds exp2 (qk_scale = softmax_scale * log2 e),
accumulation in fp32, one log2-sum-exp saved per query row for the backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention_configs import AUTOTUNE_KEY, autotune_configs, prune_to_head_dim
from kernels.attention_io import load_rows, rows_source, store_rows
from kernels.attention_tiles import allowed, tile_ranges


@triton.jit
def _fwd_steps(acc, l_i, m_i, q, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs, offs_m, seg_q,
               seg_base, start, end, seq_len, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, TMA: tl.constexpr):
    """Fold key tiles [start, end) into the running (acc, l_i, m_i) of one query tile.

    MASKED=False is the fast loop: every (query, key) pair of its tiles is allowed, so loads and scores
    go unmasked. MASKED=True masks causality, segments and the sequence end exactly. k_src, v_src:
    `rows_source`s of the batch row's keys and values, read at head kv_head.
    """
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_rows(k_src, kv_head, start_n, stride_kh, stride_ks, seq_len, BLOCK_N, HEAD_DIM, MASKED, True, TMA)
        v = load_rows(v_src, kv_head, start_n, stride_vh, stride_vs, seq_len, BLOCK_N, HEAD_DIM, MASKED, False, TMA)
        # 1. Raw scores q k^T (fp32); masked pairs become -inf.
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if MASKED:
            seg_k = tl.load(seg_base + offs_n, mask=offs_n < seq_len, other=0) if HAS_SEGMENTS else offs_n
            ok = allowed(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], seq_len,
                         CAUSAL, HAS_SEGMENTS)
            s = tl.where(ok, s, float("-inf"))
        # 2. Online softmax in log2 units: the max of raw scores times the (positive) scale is the max of
        #    scaled ones. A row with nothing allowed yet keeps max -inf; a reference of 0 stands in for it
        #    so exp2(-inf) gives exact zeros instead of NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])  # one FMA per score
        alpha = tl.math.exp2(m_i - m_ref)
        # 3. Rescale what was accumulated under the old max and add this tile: acc = acc * alpha + P V.
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=autotune_configs("fwd"), key=AUTOTUNE_KEY, prune_configs_by=prune_to_head_dim("fwd"))
@triton.jit
def attn_fwd_kernel(Q, K, V, O, LSE, SEG, BOUNDS,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                    seq_len, n_heads, group, qk_scale, SEQ_BUCKET,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_A: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """One program = BLOCK_A query rows of one (batch, query head); writes O and the rows' log2-sum-exp.

    Q (B,S,Hq,D), K/V (B,S,Hkv,D), O like Q, strides per tensor in elements (last stride 1).
    LSE (B,Hq,S) fp32, in log2 units; +inf for rows that attend to nothing.
    SEG (B,S) int32 segment ids and BOUNDS (B,2,4,S) int32 tile bounds (kernels/attention_tiles.py),
    read if HAS_SEGMENTS. seq_len S; n_heads Hq; group = Hq // Hkv; qk_scale = softmax_scale * log2(e)
    > 0; SEQ_BUCKET only keys the autotuner. TMA: Q, K, V and O tiles move through tensor descriptors
    (kernels/attention_io.py; sm_90, needs the host's scratch allocator), else through pointers.
    Grid (B*Hq, query tiles); causal tiles run heaviest (last) first, so the longest programs do not
    trail at the end of the launch.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the causal diagonal must start on a key-tile boundary")
    off_bh = tl.program_id(0)
    tile = tl.program_id(1)
    if CAUSAL:
        tile = tl.num_programs(1) - 1 - tile
    start_m = tile * BLOCK_M
    off_b = (off_bh // n_heads).to(tl.int64)  # 64-bit: batch offsets can pass 2**31 elements
    off_h = off_bh % n_heads
    kv_head = off_h // group
    q_src = rows_source(Q + off_b * stride_qb, stride_qh, n_heads, stride_qs, seq_len, BLOCK_M, HEAD_DIM, TMA)
    k_src = rows_source(K + off_b * stride_kb, stride_kh, n_heads // group, stride_ks, seq_len, BLOCK_N, HEAD_DIM, TMA)
    v_src = rows_source(V + off_b * stride_vb, stride_vh, n_heads // group, stride_vs, seq_len, BLOCK_N, HEAD_DIM, TMA)
    seg_base = SEG + off_b * seq_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_in = offs_m < seq_len
    q = load_rows(q_src, off_h, start_m, stride_qh, stride_qs, seq_len, BLOCK_M, HEAD_DIM, True, False, TMA)
    seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if HAS_SEGMENTS else offs_m

    # Keys: causally up to the tile's last row; unmasked below the diagonal (causal) or up to the last
    # whole tile (not causal); with segments, only the rows' own segments, unmasked inside their run.
    plain_hi = tl.minimum(seq_len, start_m + BLOCK_M) if CAUSAL else seq_len
    plain_full_hi = start_m if CAUSAL else seq_len
    lo, flo, fhi, hi = tile_ranges(BOUNDS + off_b * 8 * seq_len, offs_m, seq_len, 0, plain_hi, 0, plain_full_hi,
                                   BLOCK_N, HAS_SEGMENTS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs,
                               offs_m, seg_q, seg_base, flo, fhi, seq_len, qk_scale, BLOCK_N, HEAD_DIM,
                               DOT_PRECISION, False, CAUSAL, HAS_SEGMENTS, TMA)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs,
                               offs_m, seg_q, seg_base, lo, flo, seq_len, qk_scale, BLOCK_N, HEAD_DIM,
                               DOT_PRECISION, True, CAUSAL, HAS_SEGMENTS, TMA)
    acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs,
                               offs_m, seg_q, seg_base, fhi, hi, seq_len, qk_scale, BLOCK_N, HEAD_DIM,
                               DOT_PRECISION, True, CAUSAL, HAS_SEGMENTS, TMA)

    # 4. Normalise. Padding rows (segment 0) may have attended to padding keys: they, and any row that
    #    attended to nothing, store exact zeros and an lse of +inf, which zeroes their P in the backward.
    empty = l_i == 0.0
    if HAS_SEGMENTS:
        empty = empty | (seg_q == 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_dst = rows_source(O + off_b * stride_ob, stride_oh, n_heads, stride_os, seq_len, BLOCK_M, HEAD_DIM, TMA)
    store_rows(o_dst, off_h, start_m, out.to(O.dtype.element_ty), stride_oh, stride_os, seq_len, BLOCK_M, HEAD_DIM,
               TMA)
    tl.store(LSE + off_bh.to(tl.int64) * seq_len + offs_m, lse, mask=rows_in)
