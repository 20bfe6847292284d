"""The flash-attention backward kernels: P recomputed tile by tile from the saved log-sum-exp.

FlashAttention-2 (Dao, 2023), section 3.2, in three kernels:
  1. `attn_bwd_delta_kernel`  delta_i = sum_d dO_id * O_id  (the row term of the softmax gradient),
  2. `attn_bwd_dkdv_kernel`   one program per key tile, looping over query tiles: dV = P^T dO, dK = dS^T Q;
                              with FUSED_DQ it also adds dQ += dS K for each query tile by fp32 atomics,
  3. `attn_bwd_dq_kernel`     one program per query tile, looping over key tiles: dQ = dS K.
The split (2 then 3) is the default: no atomics, deterministic, and what the Triton tutorial does. The
fused variant (FA2/FA3's) saves one recomputation of QK^T and dO V^T per tile at the price of atomic
traffic and run-to-run rounding differences in dQ; which is faster on Hopper is for a GPU to measure.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention_configs import AUTOTUNE_KEY, autotune_configs, prune_to_head_dim
from kernels.attention_io import load_rows, rows_source, store_rows
from kernels.attention_tiles import allowed, tile_ranges


@triton.jit
def attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                          seq_len, n_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA (B,Hq,S) fp32 = rowsum(dO * O): sum_j P_ij dP_ij, the softmax-gradient row term (FA2 eq. 4).

    Grid (B*Hq, row tiles)."""
    off_bh = tl.program_id(0)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < seq_len
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=rows_in[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=rows_in[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * seq_len + offs_m, delta, mask=rows_in)


@triton.jit
def _dkdv_steps(dk, dv, k, v, q_src, do_src, head, lse_base, delta_base, dq_base, seg_base, stride_qh, stride_qs,
                stride_doh, stride_dos, offs_n, seg_k, start, end, seq_len, qk_scale,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, FUSED_DQ: tl.constexpr,
                TMA: tl.constexpr):
    """Add the query tiles [start, end) of one query head to a key tile's dK and dV (transposed tiles).

    q_src, do_src: `rows_source`s of the batch row's queries and output gradients, read at `head`.
    MASKED=False: every pair allowed and every query row inside S, so nothing is masked. In the masked
    loop query rows past S load lse = +inf, so their P is exactly 0. FUSED_DQ: also atomically add this
    tile's dS K into the fp32 dQ rows at dq_base (row stride HEAD_DIM).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_in = offs_m < seq_len
        q_t = load_rows(q_src, head, start_m, stride_qh, stride_qs, seq_len, BLOCK_M, HEAD_DIM, MASKED, True, TMA)
        do = load_rows(do_src, head, start_m, stride_doh, stride_dos, seq_len, BLOCK_M, HEAD_DIM, MASKED, False, TMA)
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=rows_in, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=rows_in, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # 1. Recompute P^T = exp2(K Q^T * scale * log2 e - lse) from the saved log-sum-exp (one FMA).
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if HAS_SEGMENTS else offs_m
            ok = allowed(offs_m[None, :], offs_n[:, None], seg_q[None, :], seg_k[:, None], seq_len,
                         CAUSAL, HAS_SEGMENTS)
            p_t = tl.where(ok, p_t, 0.0)
        # 2. dV += P^T dO.
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        # 3. dS^T = P^T * (dP^T - delta), with dP^T = V dO^T; then dK += dS^T Q (scale applied once at the end).
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk += tl.dot(ds_t, tl.trans(q_t), input_precision=DOT_PRECISION)
        if FUSED_DQ:  # 4. dQ[rows] += dS K, summed over key tiles by atomics (order not fixed)
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            tl.atomic_add(dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=rows_in[:, None],
                          sem="relaxed")
    return dk, dv


@triton.autotune(configs=autotune_configs("dkdv"), key=AUTOTUNE_KEY + ["FUSED_DQ"],
                 prune_configs_by=prune_to_head_dim("dkdv"), reset_to_zero=["DQ_ACC"])
@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC, SEG, BOUNDS,
                         stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                         stride_dkb, stride_dks, stride_dkh,
                         seq_len, n_kv_heads, group, qk_scale, softmax_scale, SEQ_BUCKET,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, TMA: tl.constexpr,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program = BLOCK_B keys of one (batch, key/value head); writes their dK and dV.

    Loops over the `group` query heads that share this key/value head, so dK/dV need no atomics.
    DO has Q's shape, DK and DV K's shape, each with its own strides (DK and DV share theirs).
    DQ_ACC (B,Hq,S,D) fp32 zeros, accumulated into when FUSED_DQ (unscaled). Other arguments as in
    attn_fwd_kernel (TMA: Q, K, V, dO, dK, dV tiles through descriptors; dQ atomics stay pointers).
    BLOCK_A queries per step, BLOCK_B keys per program. Grid (B*Hkv, key tiles):
    causal key tile 0 has the most queries, so the natural order is already heaviest first.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "the causal diagonal must end on a query-tile boundary")
    off_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = (off_bh // n_kv_heads).to(tl.int64)
    off_kvh = off_bh % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keys_in = offs_n < seq_len
    k = load_rows(rows_source(K + off_b * stride_kb, stride_kh, n_kv_heads, stride_ks, seq_len, BLOCK_N, HEAD_DIM, TMA),
                  off_kvh, start_n, stride_kh, stride_ks, seq_len, BLOCK_N, HEAD_DIM, True, False, TMA)
    v = load_rows(rows_source(V + off_b * stride_vb, stride_vh, n_kv_heads, stride_vs, seq_len, BLOCK_N, HEAD_DIM, TMA),
                  off_kvh, start_n, stride_vh, stride_vs, seq_len, BLOCK_N, HEAD_DIM, True, False, TMA)
    seg_base = SEG + off_b * seq_len
    seg_k = tl.load(seg_base + offs_n, mask=keys_in, other=0) if HAS_SEGMENTS else offs_n

    # Queries: causally from the tile's first key on, unmasked from the first query after its last key;
    # the unmasked loop also stops at the last whole query tile inside S.
    plain_lo = start_n if CAUSAL else 0
    plain_full_lo = start_n + BLOCK_N - 1 if CAUSAL else 0
    lo, flo, fhi, hi = tile_ranges(BOUNDS + off_b * 8 * seq_len + 4 * seq_len, offs_n, seq_len, plain_lo, seq_len,
                                   plain_full_lo, seq_len, BLOCK_M, HAS_SEGMENTS)

    n_heads = n_kv_heads * group
    q_src = rows_source(Q + off_b * stride_qb, stride_qh, n_heads, stride_qs, seq_len, BLOCK_M, HEAD_DIM, TMA)
    do_src = rows_source(DO + off_b * stride_dob, stride_doh, n_heads, stride_dos, seq_len, BLOCK_M, HEAD_DIM, TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # The loop variable is the query head itself: deriving it from a group index in the body kept one more
    # value live across the loop, a spill at head dim 128 (benchmarks/results/attention-ptxas-sm90/).
    for off_h in range(off_kvh * group, off_kvh * group + group):
        off_row = (off_b * n_heads + off_h) * seq_len  # (B, Hq, S) index of this head's row 0
        dq_base = DQ_ACC + off_row * HEAD_DIM
        dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, off_h, LSE + off_row, DELTA + off_row, dq_base, seg_base,
                             stride_qh, stride_qs, stride_doh, stride_dos, offs_n, seg_k, flo, fhi, seq_len, qk_scale,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION, False, CAUSAL, HAS_SEGMENTS, FUSED_DQ, TMA)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, off_h, LSE + off_row, DELTA + off_row, dq_base, seg_base,
                             stride_qh, stride_qs, stride_doh, stride_dos, offs_n, seg_k, lo, flo, seq_len, qk_scale,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION, True, CAUSAL, HAS_SEGMENTS, FUSED_DQ, TMA)
        dk, dv = _dkdv_steps(dk, dv, k, v, q_src, do_src, off_h, LSE + off_row, DELTA + off_row, dq_base, seg_base,
                             stride_qh, stride_qs, stride_doh, stride_dos, offs_n, seg_k, fhi, hi, seq_len, qk_scale,
                             BLOCK_M, HEAD_DIM, DOT_PRECISION, True, CAUSAL, HAS_SEGMENTS, FUSED_DQ, TMA)
    dk_dst = rows_source(DK + off_b * stride_dkb, stride_dkh, n_kv_heads, stride_dks, seq_len, BLOCK_N, HEAD_DIM, TMA)
    store_rows(dk_dst, off_kvh, start_n, (dk * softmax_scale).to(DK.dtype.element_ty), stride_dkh, stride_dks, seq_len,
               BLOCK_N, HEAD_DIM, TMA)
    dv_dst = rows_source(DV + off_b * stride_dkb, stride_dkh, n_kv_heads, stride_dks, seq_len, BLOCK_N, HEAD_DIM, TMA)
    store_rows(dv_dst, off_kvh, start_n, dv.to(DV.dtype.element_ty), stride_dkh, stride_dks, seq_len, BLOCK_N,
               HEAD_DIM, TMA)


@triton.jit
def _dq_steps(dq, q, do, lse, delta, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs, offs_m,
              seg_q, seg_base, start, end, seq_len, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, TMA: tl.constexpr):
    """Add key tiles [start, end) to one query tile's dQ (scale applied once by the caller); k_src, v_src:
    `rows_source`s of the batch row's keys and values, read at head kv_head."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = load_rows(k_src, kv_head, start_n, stride_kh, stride_ks, seq_len, BLOCK_N, HEAD_DIM, MASKED, True, TMA)
        v_t = load_rows(v_src, kv_head, start_n, stride_vh, stride_vs, seq_len, BLOCK_N, HEAD_DIM, MASKED, True, TMA)
        # 1. P = exp2(Q K^T * scale * log2 e - lse); padding rows have lse = +inf, hence P = 0.
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            seg_k = tl.load(seg_base + offs_n, mask=offs_n < seq_len, other=0) if HAS_SEGMENTS else offs_n
            ok = allowed(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], seq_len,
                         CAUSAL, HAS_SEGMENTS)
            p = tl.where(ok, p, 0.0)
        # 2. dS = P * (dO V^T - delta); dQ += dS K.
        ds = p * (tl.dot(do, v_t, input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=autotune_configs("dq"), key=AUTOTUNE_KEY, prune_configs_by=prune_to_head_dim("dq"))
@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SEG, BOUNDS,
                       stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                       stride_dqb, stride_dqs, stride_dqh,
                       seq_len, n_heads, group, qk_scale, softmax_scale, SEQ_BUCKET,
                       HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    """One program = BLOCK_A query rows of one (batch, query head); writes their dQ (DQ shaped like Q).

    Arguments as in attn_fwd_kernel (TMA: Q, K, V, dO, dQ tiles through descriptors); BLOCK_A query
    rows per program, BLOCK_B keys per step; grid (B*Hq, query tiles), causal tiles heaviest first.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the causal diagonal must start on a key-tile boundary")
    off_bh = tl.program_id(0)
    tile = tl.program_id(1)
    if CAUSAL:
        tile = tl.num_programs(1) - 1 - tile
    start_m = tile * BLOCK_M
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = off_bh % n_heads
    kv_head = off_h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_in = offs_m < seq_len
    q = load_rows(rows_source(Q + off_b * stride_qb, stride_qh, n_heads, stride_qs, seq_len, BLOCK_M, HEAD_DIM, TMA),
                  off_h, start_m, stride_qh, stride_qs, seq_len, BLOCK_M, HEAD_DIM, True, False, TMA)
    do = load_rows(rows_source(DO + off_b * stride_dob, stride_doh, n_heads, stride_dos, seq_len, BLOCK_M, HEAD_DIM,
                               TMA),
                   off_h, start_m, stride_doh, stride_dos, seq_len, BLOCK_M, HEAD_DIM, True, False, TMA)
    lse = tl.load(LSE + off_bh.to(tl.int64) * seq_len + offs_m, mask=rows_in, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * seq_len + offs_m, mask=rows_in, other=0.0)
    seg_base = SEG + off_b * seq_len
    seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if HAS_SEGMENTS else offs_m
    k_src = rows_source(K + off_b * stride_kb, stride_kh, n_heads // group, stride_ks, seq_len, BLOCK_N, HEAD_DIM, TMA)
    v_src = rows_source(V + off_b * stride_vb, stride_vh, n_heads // group, stride_vs, seq_len, BLOCK_N, HEAD_DIM, TMA)

    plain_hi = tl.minimum(seq_len, start_m + BLOCK_M) if CAUSAL else seq_len
    plain_full_hi = start_m if CAUSAL else seq_len
    lo, flo, fhi, hi = tile_ranges(BOUNDS + off_b * 8 * seq_len, offs_m, seq_len, 0, plain_hi, 0, plain_full_hi,
                                   BLOCK_N, HAS_SEGMENTS)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs, offs_m,
                   seg_q, seg_base, flo, fhi, seq_len, qk_scale, BLOCK_N, HEAD_DIM, DOT_PRECISION, False, CAUSAL,
                   HAS_SEGMENTS, TMA)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs, offs_m,
                   seg_q, seg_base, lo, flo, seq_len, qk_scale, BLOCK_N, HEAD_DIM, DOT_PRECISION, True, CAUSAL,
                   HAS_SEGMENTS, TMA)
    dq = _dq_steps(dq, q, do, lse, delta, k_src, v_src, kv_head, stride_kh, stride_ks, stride_vh, stride_vs, offs_m,
                   seg_q, seg_base, fhi, hi, seq_len, qk_scale, BLOCK_N, HEAD_DIM, DOT_PRECISION, True, CAUSAL,
                   HAS_SEGMENTS, TMA)
    store_rows(rows_source(DQ + off_b * stride_dqb, stride_dqh, n_heads, stride_dqs, seq_len, BLOCK_M, HEAD_DIM, TMA),
               off_h, start_m, (dq * softmax_scale).to(DQ.dtype.element_ty), stride_dqh, stride_dqs, seq_len, BLOCK_M,
               HEAD_DIM, TMA)
