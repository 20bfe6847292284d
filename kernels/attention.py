"""Flash attention in Triton: causal, packed segments, grouped-query heads, forward and backward.

    out = flash_attention(q, k, v, causal=True, segment_ids=batch.segment_ids)   # q (B,S,Hq,D), k/v (B,S,Hkv,D)

The algorithm is FlashAttention-2 (Dao, 2023): the forward walks key tiles with an online softmax,
accumulates in fp32 and saves one log-sum-exp per query row; the backward never stores P = softmax(QK^T)
but recomputes it tile by tile from that log-sum-exp, in three kernels:
  1. `_attn_bwd_delta_kernel`  delta_i = sum_d dO_id * O_id  (the row term of the softmax gradient),
  2. `_attn_bwd_dkdv_kernel`   one program per key tile, looping over query tiles: dV = P^T dO, dK = dS^T Q,
  3. `_attn_bwd_dq_kernel`     one program per query tile, looping over key tiles: dQ = dS K.
Split versus fused backward: the split is the FA2 / Triton-tutorial default: it needs no atomics and
stays deterministic. A fused kernel (dQ by atomic adds) saves one recomputation of QK^T; which is
faster on Hopper is to be re-measured with benchmarks/attention.py on a GPU.

Packed segments (engine/batch.py): a query attends to keys of its own segment id, at or before it when
causal; id 0 is padding and attends to nothing, so its output and gradients are exactly zero. The mask
is always applied exactly; in addition each program skips tiles that cannot hold an allowed pair, from
per-token bounds computed on the host in O(B*S) (`_segment_bounds`): the first and one-past-last index
of every segment id in the row. Packing writes segments as contiguous, increasing runs with padding at
the end of the row; then a query tile visits only the keys of its own segments, so a row of short
examples costs in proportion to the attention it contains. Other layouts stay correct (bounds only
widen), they just skip less.

GQA: a query head h reads key/value head h // (Hq / Hkv) through strides, never a repeated copy; the
dK/dV program of a key/value head loops over the query heads of its group, so it needs no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.attention_reference import attention_reference

__all__ = ["flash_attention", "attention_reference", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e)), one fewer multiply per tile


def _interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def _configs(hopper: list[tuple[int, int, int, int]], interpreter: tuple[int, int]) -> list[triton.Config]:
    """Autotune candidates as (BLOCK_A, BLOCK_B, num_warps, num_stages).

    On a GPU: the candidates below were chosen by compiling every kernel for sm_90 (Hopper) at head
    dims 64 and 128, with and without segments, and keeping tile shapes that ptxas fits in 255
    registers without (or with only a few bytes of) spills: `python -m benchmarks.attention --ptxas`
    prints that table again. Which one wins is measured by the autotuner on the GPU. Under the
    interpreter: one small config, since tuning there only wastes time; 16 is the smallest tile
    tl.dot accepts.
    """
    if _interpreting():
        hopper = [(*interpreter, 1, 1)]
    return [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s) for a, b, w, s in hopper]


# Forward and dQ: BLOCK_A query rows per program, BLOCK_B keys per step (BLOCK_A % BLOCK_B == 0 so that
# the causal diagonal starts on a key-tile boundary). dK/dV: BLOCK_A queries per step, BLOCK_B keys per
# program (BLOCK_B % BLOCK_A == 0 for the same reason, mirrored). dK/dV holds two fp32 accumulators of
# BLOCK_B x D, hence its smaller tiles.
FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 3), (64, 16, 4, 3)]
DKDV_CONFIGS = [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 3), (16, 32, 4, 3),
                (32, 32, 4, 2)]
_FWD_CONFIGS = _configs(FWD_CONFIGS, interpreter=(32, 16))
_DQ_CONFIGS = _configs(DQ_CONFIGS, interpreter=(32, 16))
_DKDV_CONFIGS = _configs(DKDV_CONFIGS, interpreter=(16, 32))
# Retune per power-of-two sequence length rather than per exact length, so evaluation batches of many
# lengths do not each trigger a tuning run.
_AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_SEGMENTS"]


@triton.jit
def _allowed(rows_q, cols_k, seg_q, seg_k, seq_len,
             CAUSAL_MASK: tl.constexpr, SEGMENT_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr):
    """True where query index rows_q may attend to key index cols_k (at least one mask flag is set).

    rows_q/seg_q and cols_k/seg_k come already broadcast against each other ([:, None] and [None, :] in
    either order), so the same helper serves the (query, key) and the transposed (key, query) tiles.
    Padding queries (segment 0) match padding keys here; callers zero them by other means (forward:
    the output rows; backward: their log-sum-exp of +inf), which keeps this tile test to one compare.
    """
    if SEGMENT_MASK:
        allowed = seg_q == seg_k
        if CAUSAL_MASK:
            allowed = allowed & (cols_k <= rows_q)
    elif CAUSAL_MASK:
        allowed = cols_k <= rows_q
    else:
        allowed = cols_k < seq_len
    if BOUNDS_MASK and (SEGMENT_MASK or CAUSAL_MASK):
        allowed = allowed & (cols_k < seq_len)
    return allowed


@triton.jit
def _tile_range(bounds_ptr, offs, seq_len, plain_lo, plain_hi, BLOCK_STEP: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr):
    """[lo, hi) of the other axis that a tile of rows `offs` must visit, lo rounded down to a step.

    With segments: the widest of the rows' per-token bounds (stored as lo at bounds_ptr[0, :] and hi at
    bounds_ptr[1, :] of a (2, S) slice), intersected with the plain causal range; rows past the sequence
    or of padding carry an empty range (lo=S, hi=0) and so do not widen it.
    """
    lo = plain_lo
    hi = plain_hi
    if HAS_SEGMENTS:
        in_seq = offs < seq_len
        lo = tl.maximum(lo, tl.min(tl.load(bounds_ptr + offs, mask=in_seq, other=seq_len), axis=0))
        hi = tl.minimum(hi, tl.max(tl.load(bounds_ptr + seq_len + offs, mask=in_seq, other=0), axis=0))
    return (lo // BLOCK_STEP) * BLOCK_STEP, hi


@triton.jit
def _attn_fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q, seg_base,
                    start, end, seq_len, qk_scale,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, SEGMENT_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr):
    """Fold key tiles [start, end) into the running (acc, l_i, m_i) of one query tile (online softmax)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        if BOUNDS_MASK:  # only the last tile can run past S; unmasked loads pipeline better
            k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None])
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :])
        # 1. Scores in log2 units: s = (q k^T) * scale * log2(e), fp32.
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL_MASK or SEGMENT_MASK or BOUNDS_MASK:
            seg_k = tl.load(seg_base + offs_n, mask=in_seq, other=0) if SEGMENT_MASK else offs_n
            allowed = _allowed(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], seq_len,
                               CAUSAL_MASK, SEGMENT_MASK, BOUNDS_MASK)
            s = tl.where(allowed, s, float("-inf"))
        # 2. Online softmax: new running max; a row with nothing allowed yet keeps max -inf, so a
        #    reference of 0 stands in for it and exp2 of -inf gives exact zeros instead of NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        # 3. Rescale what was accumulated under the old max and add this tile: acc = acc * alpha + P V.
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEG, KV_BOUNDS,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     seq_len, n_heads, group, qk_scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program = BLOCK_A query rows of one (batch, query head); writes O and the rows' log2-sum-exp.

    Q (B,S,Hq,D), K/V (B,S,Hkv,D), O like Q, strides per tensor in elements (last stride 1).
    LSE (B,Hq,S) fp32, in log2 units; +inf for rows that attend to nothing.
    SEG (B,S) int32 segment ids and KV_BOUNDS (B,2,S) int32 per-query key range, read if HAS_SEGMENTS.
    seq_len S; n_heads Hq; group = Hq // Hkv; qk_scale = softmax_scale * log2(e); SEQ_BUCKET only keys
    the autotuner. BLOCK_A query rows per program, BLOCK_B keys per step.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the causal diagonal must start on a key-tile boundary")
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)  # 64-bit: batch offsets can pass 2**31 elements
    off_h = (off_bh % n_heads).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + (off_h // group) * stride_kh
    v_base = V + off_b * stride_vb + (off_h // group) * stride_vh
    seg_base = SEG + off_b * seq_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < seq_len
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=rows_in[:, None], other=0.0)
    seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if HAS_SEGMENTS else offs_m

    # Key range: causally up to the tile's last row; with segments, only the tiles' own segments.
    plain_hi = tl.minimum(seq_len, start_m + BLOCK_M) if CAUSAL else seq_len
    lo, hi = _tile_range(KV_BOUNDS + off_b * 2 * seq_len, offs_m, seq_len, 0, plain_hi, BLOCK_N, HAS_SEGMENTS)
    # Keys below `mid` need no causal or bounds mask: before the diagonal (causal) / full tiles (not).
    mid = start_m if CAUSAL else (seq_len // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q,
                                    seg_base, lo, tl.minimum(hi, mid), seq_len, qk_scale,
                                    BLOCK_N, HEAD_DIM, DOT_PRECISION, False, HAS_SEGMENTS, False)
    acc, l_i, m_i = _attn_fwd_steps(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q,
                                    seg_base, tl.maximum(lo, mid), hi, seq_len, qk_scale,
                                    BLOCK_N, HEAD_DIM, DOT_PRECISION, CAUSAL, HAS_SEGMENTS, True)

    # 4. Normalise. Padding rows (segment 0) may have attended to padding keys: they, and any row that
    #    attended to nothing, store exact zeros and an lse of +inf, which zeroes their P in the backward.
    empty = l_i == 0.0
    if HAS_SEGMENTS:
        empty = empty | (seg_q == 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_base = O + off_b * stride_ob + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rows_in[:, None])
    tl.store(LSE + off_bh.to(tl.int64) * seq_len + offs_m, lse, mask=rows_in)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                           seq_len, n_heads, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA (B,Hq,S) fp32 = rowsum(dO * O): sum_j P_ij dP_ij, the softmax-gradient row term (FA2 eq. 4)."""
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < seq_len
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=rows_in[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=rows_in[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * seq_len + offs_m, delta, mask=rows_in)


@triton.jit
def _attn_bwd_dkdv_steps(dk, dv, k, v, q_base, do_base, lse_base, delta_base, seg_base, stride_qs, stride_dos,
                         offs_n, seg_k, start, end, seq_len, qk_scale,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         CAUSAL_MASK: tl.constexpr, SEGMENT_MASK: tl.constexpr):
    """Add the query tiles [start, end) of one query head to a key tile's dK and dV (transposed tiles).

    Query rows past the sequence or of padding load lse = +inf, so their P is exactly 0 without a mask.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_in = offs_m < seq_len
        q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None], mask=rows_in[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=rows_in[:, None], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=rows_in, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=rows_in, other=0.0)
        # 1. Recompute P^T = exp2(K Q^T * scale * log2 e - lse) from the saved log-sum-exp.
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if CAUSAL_MASK or SEGMENT_MASK:
            seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if SEGMENT_MASK else offs_m
            allowed = _allowed(offs_m[None, :], offs_n[:, None], seg_q[None, :], seg_k[:, None], seq_len,
                               CAUSAL_MASK, SEGMENT_MASK, False)
            p_t = tl.where(allowed, p_t, 0.0)
        # 2. dV += P^T dO.
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        # 3. dS^T = P^T * (dP^T - delta), with dP^T = V dO^T; then dK += dS^T Q (scale applied once at the end).
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SEG, Q_BOUNDS,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                          stride_dkb, stride_dks, stride_dkh,
                          seq_len, n_kv_heads, group, qk_scale, softmax_scale, SEQ_BUCKET,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program = BLOCK_B keys of one (batch, key/value head); writes their dK and dV.

    Loops over the `group` query heads that share this key/value head, so GQA needs no atomics.
    DO has Q's shape, DK and DV K's shape, each with its own strides (DK and DV share theirs).
    Q_BOUNDS (B,2,S) int32: per key, the range of queries that may attend to it. Other arguments as in
    `_attn_fwd_kernel`. BLOCK_A queries per step, BLOCK_B keys per program.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "the causal diagonal must end on a query-tile boundary")
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_kv_heads).to(tl.int64)
    off_kvh = (off_bh % n_kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys_in = offs_n < seq_len
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=keys_in[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=keys_in[:, None], other=0.0)
    seg_base = SEG + off_b * seq_len
    seg_k = tl.load(seg_base + offs_n, mask=keys_in, other=0) if HAS_SEGMENTS else offs_n

    # Query range: causally from the tile's first key on; with segments, to the end of its last segment.
    plain_lo = start_n if CAUSAL else 0
    lo, hi = _tile_range(Q_BOUNDS + off_b * 2 * seq_len, offs_n, seq_len, plain_lo, seq_len, BLOCK_M,
                         HAS_SEGMENTS)
    # Queries from `mid` on lie wholly after this key tile: no causal mask needed there.
    mid = start_n + BLOCK_N if CAUSAL else lo

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(group):
        off_h = off_kvh * group + g
        off_q = off_b * stride_qb + off_h * stride_qh
        off_do = off_b * stride_dob + off_h * stride_doh
        off_row = (off_b * n_kv_heads * group + off_h) * seq_len  # (B, Hq, S) index of this head's row 0
        dk, dv = _attn_bwd_dkdv_steps(dk, dv, k, v, Q + off_q, DO + off_do, LSE + off_row, DELTA + off_row,
                                      seg_base, stride_qs, stride_dos, offs_n, seg_k, lo, tl.minimum(hi, mid),
                                      seq_len, qk_scale, BLOCK_M, HEAD_DIM, DOT_PRECISION, CAUSAL, HAS_SEGMENTS)
        dk, dv = _attn_bwd_dkdv_steps(dk, dv, k, v, Q + off_q, DO + off_do, LSE + off_row, DELTA + off_row,
                                      seg_base, stride_qs, stride_dos, offs_n, seg_k, tl.maximum(lo, mid), hi,
                                      seq_len, qk_scale, BLOCK_M, HEAD_DIM, DOT_PRECISION, False, HAS_SEGMENTS)
    dkv_offs = off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    tl.store(DK + dkv_offs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=keys_in[:, None])
    tl.store(DV + dkv_offs, dv.to(DV.dtype.element_ty), mask=keys_in[:, None])


@triton.jit
def _attn_bwd_dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q, seg_base,
                       start, end, seq_len, qk_scale,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       CAUSAL_MASK: tl.constexpr, SEGMENT_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr):
    """Add key tiles [start, end) to one query tile's dQ (scale applied once by the caller)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_len
        if BOUNDS_MASK:  # only the last tile can run past S
            k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=in_seq[None, :], other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        else:
            k_t = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None])
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None])
        # 1. P = exp2(Q K^T * scale * log2 e - lse); padding rows have lse = +inf, hence P = 0.
        p = tl.math.exp2(tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if CAUSAL_MASK or SEGMENT_MASK or BOUNDS_MASK:
            seg_k = tl.load(seg_base + offs_n, mask=in_seq, other=0) if SEGMENT_MASK else offs_n
            allowed = _allowed(offs_m[:, None], offs_n[None, :], seg_q[:, None], seg_k[None, :], seq_len,
                               CAUSAL_MASK, SEGMENT_MASK, BOUNDS_MASK)
            p = tl.where(allowed, p, 0.0)
        # 2. dS = P * (dO V^T - delta); dQ += dS K.
        ds = p * (tl.dot(do, v_t, input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SEG, KV_BOUNDS,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                        stride_dqb, stride_dqs, stride_dqh,
                        seq_len, n_heads, group, qk_scale, softmax_scale, SEQ_BUCKET,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program = BLOCK_A query rows of one (batch, query head); writes their dQ (DQ shaped like Q).

    Arguments as in `_attn_fwd_kernel`; BLOCK_A query rows per program, BLOCK_B keys per step.
    """
    BLOCK_M: tl.constexpr = BLOCK_A
    BLOCK_N: tl.constexpr = BLOCK_B
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the causal diagonal must start on a key-tile boundary")
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_in = offs_m < seq_len
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=rows_in[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=rows_in[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * seq_len + offs_m, mask=rows_in, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * seq_len + offs_m, mask=rows_in, other=0.0)
    seg_base = SEG + off_b * seq_len
    seg_q = tl.load(seg_base + offs_m, mask=rows_in, other=0) if HAS_SEGMENTS else offs_m
    k_base = K + off_b * stride_kb + (off_h // group) * stride_kh
    v_base = V + off_b * stride_vb + (off_h // group) * stride_vh

    plain_hi = tl.minimum(seq_len, start_m + BLOCK_M) if CAUSAL else seq_len
    lo, hi = _tile_range(KV_BOUNDS + off_b * 2 * seq_len, offs_m, seq_len, 0, plain_hi, BLOCK_N, HAS_SEGMENTS)
    mid = start_m if CAUSAL else (seq_len // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _attn_bwd_dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q, seg_base,
                            lo, tl.minimum(hi, mid), seq_len, qk_scale,
                            BLOCK_N, HEAD_DIM, DOT_PRECISION, False, HAS_SEGMENTS, False)
    dq = _attn_bwd_dq_steps(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, seg_q, seg_base,
                            tl.maximum(lo, mid), hi, seq_len, qk_scale,
                            BLOCK_N, HEAD_DIM, DOT_PRECISION, CAUSAL, HAS_SEGMENTS, True)
    dq_offs = off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :]
    tl.store(DQ + dq_offs, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=rows_in[:, None])


# ----------------------------------------------------------------------------------------------------
# Host side: checks, segment bounds, launches, autograd.
# ----------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DELTA_BLOCK_M = 64  # rows per program of the tiny rowsum kernel; any power of two works


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None) -> None:
    """Raise one clear error for anything the kernels do not handle."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be 4-D (B, S, H, D); got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, S, Hq, D = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != (B, S, D):
        raise ValueError(f"flash_attention: k and v must both be (B, S, Hkv, D) = ({B}, {S}, Hkv, {D}) to match "
                         f"q {tuple(q.shape)}; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % k.shape[2] != 0:
        raise ValueError(f"flash_attention: query heads Hq={Hq} must be a multiple of key/value heads "
                         f"Hkv={k.shape[2]} (grouped-query attention)")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim D={D} is not supported; the kernel handles D in "
                         f"{SUPPORTED_HEAD_DIMS}. Choose one of those head_dim values, or use attention_reference "
                         f"(model attention='torch') for other sizes")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"flash_attention: q, k, v must share one dtype among float16, bfloat16, float32; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on {q.device}, {k.device}, {v.device}; put them on one device")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"flash_attention: tensors are on {q.device}; the Triton kernel needs a CUDA device, or "
                           f"TRITON_INTERPRET=1 (Triton's slow CPU interpreter, for tests). On CPU use "
                           f"attention_reference, i.e. the model's attention='torch'")
    if segment_ids is not None:
        if segment_ids.shape != (B, S) or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"flash_attention: segment_ids must be an integer (B, S) = ({B}, {S}) tensor; got "
                             f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
        if segment_ids.device != q.device:
            raise ValueError(f"flash_attention: segment_ids is on {segment_ids.device} but q on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(1) * S >= 2**31:  # in-kernel row offsets are 32-bit; batch and head offsets are 64-bit
            raise ValueError(f"flash_attention: {name} spans {t.stride(1) * S} elements along S, over the 2**31 "
                             f"the kernel's row offsets address; split the batch along S or heads")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/sequence/head strides but need unit stride along the head dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _segment_bounds(segment_ids: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token tile-skipping bounds, two (B, 2, S) int32 tensors [lo; hi), in O(B*S) torch ops.

    kv_bounds[b, :, i]: the keys query i may attend to lie in [lo, hi).
    q_bounds[b, :, j]:  the queries that may attend to key j lie in [lo, hi).
    A segment spans from the first to one past the last index that carries its id. Padding (id 0)
    gets the empty range (S, 0). Ids outside 0..S are clamped into one shared bucket before the
    min/max: that can only widen some ranges, and the kernels mask exactly, so results never depend
    on these bounds being tight.
    """
    B, S = segment_ids.shape
    seg = segment_ids.long()
    idx = torch.arange(S, device=seg.device).expand(B, S)
    bucket = seg.clamp(0, S)
    first = torch.full((B, S + 1), S, dtype=torch.long, device=seg.device).scatter_reduce(1, bucket, idx, "amin")
    last = torch.full((B, S + 1), -1, dtype=torch.long, device=seg.device).scatter_reduce(1, bucket, idx, "amax")
    seg_lo, seg_hi = first.gather(1, bucket), last.gather(1, bucket) + 1
    pad = seg == 0
    empty_lo, empty_hi = torch.full_like(idx, S), torch.zeros_like(idx)
    kv_lo = torch.where(pad, empty_lo, seg_lo)
    kv_hi = torch.where(pad, empty_hi, idx + 1 if causal else seg_hi)
    q_lo = torch.where(pad, empty_lo, idx if causal else seg_lo)
    q_hi = torch.where(pad, empty_hi, seg_hi)
    kv_bounds = torch.stack([kv_lo, kv_hi], dim=1).to(torch.int32).contiguous()
    q_bounds = torch.stack([q_lo, q_hi], dim=1).to(torch.int32).contiguous()
    return kv_bounds, q_bounds


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE products (tf32 would miss the 1e-5 fp32 tolerance); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      segment_ids: torch.Tensor | None, softmax_scale: float,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Run the forward kernel. Returns (out (B,S,Hq,D), lse (B,Hq,S) fp32 log2-sum-exp, segment state).

    `out`, when given, is written in place (every element, padding included). The segment state
    (seg, kv_bounds, q_bounds) is what the backward needs again.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if segment_ids is not None:
        seg = segment_ids.to(torch.int32).contiguous()
        kv_bounds, q_bounds = _segment_bounds(seg, causal)
    else:  # never read (HAS_SEGMENTS=False) but the kernels need a pointer
        seg = kv_bounds = q_bounds = torch.zeros(1, dtype=torch.int32, device=q.device)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_A"]), B * Hq)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, seg, kv_bounds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        S, Hq, Hq // Hkv, softmax_scale * LOG2E, triton.next_power_of_2(S),
        HEAD_DIM=D, CAUSAL=causal, HAS_SEGMENTS=segment_ids is not None, DOT_PRECISION=_dot_precision(q.dtype))
    return out, lse, (seg, kv_bounds, q_bounds)


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, segment_state: tuple, *, causal: bool, has_segments: bool,
                       softmax_scale: float, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the three backward kernels; returns (dq, dk, dv), written into `grads` when given."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    seg, kv_bounds, q_bounds = segment_state
    if grads is None:
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq, dk, dv = grads
    delta = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(S, _DELTA_BLOCK_M), B * Hq)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], S, Hq, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_SEGMENTS=has_segments, DOT_PRECISION=_dot_precision(q.dtype))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scales = (softmax_scale * LOG2E, softmax_scale, triton.next_power_of_2(S))
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_B"]), B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, seg, q_bounds, *strides, *dk.stride()[:3],
        S, Hkv, Hq // Hkv, *scales, **flags)
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_A"]), B * Hq)](
        q, k, v, do, dq, lse, delta, seg, kv_bounds, *strides, *dq.stride()[:3],
        S, Hq, Hq // Hkv, *scales, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves O and the log-sum-exp; backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, segment_ids, softmax_scale: float):
        out, lse, segment_state = attention_forward(q, k, v, causal=causal, segment_ids=segment_ids,
                                                    softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, *segment_state)
        ctx.causal, ctx.has_segments, ctx.softmax_scale = causal, segment_ids is not None, softmax_scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, do):
        q, k, v, out, lse, *segment_state = ctx.saved_tensors
        dq, dk, dv = attention_backward(_last_dim_contiguous(do), q, k, v, out, lse, tuple(segment_state),
                                        causal=ctx.causal, has_segments=ctx.has_segments,
                                        softmax_scale=ctx.softmax_scale)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    segment_ids: torch.Tensor | None = None, softmax_scale: float | None = None) -> torch.Tensor:
    """Differentiable softmax(q k^T * scale + mask) v without any S x S tensor.

    q (B, S, Hq, D), k and v (B, S, Hkv, D) with Hq a multiple of Hkv and D in 32/64/128; one dtype
    among float16, bfloat16, float32. causal: query i sees keys j <= i. segment_ids (B, S) integer,
    1..n per packed example and 0 for padding: a query sees only keys of its own segment, and padding
    rows get zero output and zero gradients. softmax_scale defaults to D ** -0.5. Returns (B, S, Hq, D).
    """
    _check_inputs(q, k, v, segment_ids)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: softmax_scale={softmax_scale} must be finite")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, causal, segment_ids, scale)
