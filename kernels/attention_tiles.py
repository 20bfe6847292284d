"""Which tiles of the attention matrix a program visits, and which of them need no mask.

Host side, once per batch (`segment_bounds`): for every token, four bounds on the other axis, stored as
one (B, 2, 4, S) int32 tensor. Side 0 is per query (over keys), side 1 per key (over queries); the four
rows of a side are
    [visit_lo, visit_hi)  every allowed partner lies inside: the first and one past the last index of
                          the token's segment id (intersected with causality), so tiles outside are skipped;
    [full_lo, full_hi)    every index inside is an allowed partner: the token's own run of equal ids
                          (intersected with causality), so a tile inside every row's full range needs no
                          mask at all (FlexAttention's "full blocks").
Padding (id 0) gets empty ranges (S, 0) on both. Packing writes segments as contiguous runs, so both pairs
coincide and a query tile wholly inside one document walks its keys unmasked up to the diagonal; other
layouts (repeated ids, any values) stay exact, since the masked loops mask exactly and the unmasked loop
only covers runs, which are allowed by construction.

Device side (`tile_ranges`): a program reduces its rows' bounds to three consecutive loops over the other
axis: [lo, flo) masked, [flo, fhi) unmasked, [fhi, hi) masked; `allowed` is the mask of the masked loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_GRID_TILES = 65535  # CUDA's limit on grid dimensions y and z; B * heads goes on x (limit 2**31 - 1)


@dataclass(frozen=True)
class AttentionSegments:
    """Segment ids with their tile bounds, computed once per batch and shared by every layer.

    ids (B, S) int32 (0 = padding); bounds (B, 2, 4, S) int32 as described in the module docstring;
    causal: the masking the bounds were computed for.
    """

    ids: torch.Tensor
    bounds: torch.Tensor
    causal: bool


def segment_bounds(segment_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 2, 4, S) int32 visit and full ranges of every token, in O(B*S) torch ops (see module docstring).

    Ids outside 0..S share one bucket before the first/last reduction: that can only widen the visit
    ranges, never the full ones (those come from runs), so results never depend on the ids' values.
    """
    B, S = segment_ids.shape
    seg = segment_ids.long()
    dev = seg.device
    idx = torch.arange(S, device=dev).expand(B, S)
    bucket = seg.clamp(0, S)
    first = torch.full((B, S + 1), S, dtype=torch.long, device=dev).scatter_reduce(1, bucket, idx, "amin")
    last = torch.full((B, S + 1), -1, dtype=torch.long, device=dev).scatter_reduce(1, bucket, idx, "amax")
    id_lo, id_hi = first.gather(1, bucket), last.gather(1, bucket) + 1
    # Runs of equal ids: start = last change at or before i, end = first change after i.
    change = torch.ones(B, S + 1, dtype=torch.bool, device=dev)
    change[:, 1:S] = seg[:, 1:] != seg[:, :-1]
    run_lo = torch.where(change[:, :S], idx, 0).cummax(dim=1).values
    run_hi = torch.where(change[:, 1:], idx + 1, S).flip(1).cummin(dim=1).values.flip(1)
    after = idx + 1  # causal: query i sees keys < i + 1; key j is seen by queries >= j
    kv = [id_lo, after if causal else id_hi, run_lo, after if causal else run_hi]
    q = [idx if causal else id_lo, id_hi, idx if causal else run_lo, run_hi]
    pad = seg == 0
    empty = [torch.full_like(idx, S), torch.zeros_like(idx)] * 2
    sides = [torch.stack([torch.where(pad, e, b) for b, e in zip(side, empty)], dim=1) for side in (kv, q)]
    return torch.stack(sides, dim=1).to(torch.int32).contiguous()


def attention_segments(segment_ids: torch.Tensor, causal: bool = True) -> AttentionSegments:
    """The ids and bounds flash_attention needs, for a caller that runs many layers on one batch."""
    if segment_ids.dim() != 2 or segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"attention_segments: segment_ids must be an integer (B, S) tensor; got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    ids = segment_ids.to(torch.int32).contiguous()
    return AttentionSegments(ids=ids, bounds=segment_bounds(ids, causal), causal=causal)


def launch_grid(batch_heads: int, seq_len: int, block: int) -> tuple[int, int]:
    """(B * heads, tiles along S): B * heads on grid axis 0, whose CUDA limit is 2**31 - 1, so any batch
    launches (on axis 1 it was capped at 65535); the tiles take axis 1, up to 65535 * block tokens."""
    tiles = triton.cdiv(seq_len, block)
    if tiles > MAX_GRID_TILES:
        raise ValueError(f"flash_attention: S={seq_len} needs {tiles} tiles of {block}, over the grid's "
                         f"{MAX_GRID_TILES}; split the sequence")
    return batch_heads, max(tiles, 1)


@triton.jit
def tile_ranges(bounds_ptr, offs, seq_len, plain_lo, plain_hi, plain_full_lo, plain_full_hi,
                STEP: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """(lo, flo, fhi, hi): the other-axis loops of the tile of rows `offs`, all but hi multiples of STEP.

    plain_*: the ranges without segments (causality and the sequence end). With segments, bounds_ptr
    points at this row's side of the (4, S) bounds: visit ranges widen to the rows' widest, full ranges
    shrink to the rows' narrowest; rows past S leave both unchanged.
    """
    lo = plain_lo
    hi = plain_hi
    flo = plain_full_lo
    fhi = plain_full_hi
    if HAS_SEGMENTS:
        in_seq = offs < seq_len
        lo = tl.maximum(lo, tl.min(tl.load(bounds_ptr + offs, mask=in_seq, other=seq_len), axis=0))
        hi = tl.minimum(hi, tl.max(tl.load(bounds_ptr + seq_len + offs, mask=in_seq, other=0), axis=0))
        flo = tl.maximum(flo, tl.max(tl.load(bounds_ptr + 2 * seq_len + offs, mask=in_seq, other=0), axis=0))
        fhi = tl.minimum(fhi, tl.min(tl.load(bounds_ptr + 3 * seq_len + offs, mask=in_seq, other=seq_len), axis=0))
    lo = (lo // STEP) * STEP
    flo = tl.minimum(tl.maximum(((flo + STEP - 1) // STEP) * STEP, lo), hi)  # a whole tile inside, rounded up
    fhi = tl.minimum(tl.maximum((fhi // STEP) * STEP, flo), hi)  # ... and rounded down
    return lo, flo, fhi, hi


@triton.jit
def allowed(rows_q, cols_k, seg_q, seg_k, seq_len, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """True where query index rows_q may attend to key index cols_k, inside the sequence.

    Arguments come broadcast against each other ([:, None] and [None, :] in either order), so the same
    helper serves the (query, key) and the transposed (key, query) tiles. Padding queries (segment 0)
    match padding keys here; callers zero them by other means (forward: the output rows; backward:
    their log-sum-exp of +inf), which keeps this test to one compare per mask.
    """
    ok = cols_k < seq_len
    if HAS_SEGMENTS:
        ok = ok & (seg_q == seg_k)
    if CAUSAL:
        ok = ok & (cols_k <= rows_q)
    return ok
