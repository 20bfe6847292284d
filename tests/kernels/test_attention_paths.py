"""The attention fast paths (kernels/attention_tiles.py and friends) against the fp32 reference.

Each path is exercised on shapes that reach it: no segment ids vs all-ones ids, full tiles inside long
segments, the fused backward vs the split one, the launch grid beyond 65535 batch-heads, misaligned views.
"""
from __future__ import annotations

import pytest
import torch

from kernels.attention import aligned, attention_segments, flash_attention
from kernels.attention_configs import INTERPRETER_TILES
from kernels.attention_tiles import MAX_GRID_TILES, launch_grid
from tests.kernels.test_attention import assert_matches, make_inputs, packed_segments, run_both

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


def grads_of(q, k, v, grad_out, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, **kwargs)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@DTYPES
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_no_segment_ids_equals_all_ones(dtype, causal):
    """The unmasked path (None) and the segment path (all ones) agree exactly, and match the reference."""
    B, S, Hq, Hkv, D = 1, 45, 2, 1, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype)
    plain = grads_of(q, k, v, grad_out, causal=causal)
    ones = grads_of(q, k, v, grad_out, causal=causal, segment_ids=torch.ones(B, S, dtype=torch.int32))
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, ones):
        assert torch.equal(a, b), f"{name}: None and all-ones segment ids differ"
    _, ref = run_both(q, k, v, grad_out, causal=causal)
    assert_matches(plain, ref, dtype)


def full_tile_counts(segment_ids: torch.Tensor, causal: bool, kernel: str) -> int:
    """How many (tile, other-tile) pairs the kernel `kernel` runs unmasked, from the bounds alone
    (the same reductions as tile_ranges, in torch), to check that a test packing reaches the fast loop."""
    a, b = INTERPRETER_TILES[kernel]
    rows, step, side = (a, b, 0) if kernel != "dkdv" else (b, a, 1)
    bounds = attention_segments(segment_ids, causal).bounds[:, side]  # (B, 4, S)
    S = segment_ids.shape[1]
    total = 0
    for start in range(0, S, rows):
        tile = bounds[:, :, start:start + rows]
        flo = int(tile[:, 2].amax())
        fhi = int(tile[:, 3].amin())
        flo, fhi = -(-flo // step) * step, (fhi // step) * step
        total += max(0, (fhi - flo) // step)
    return total


@DTYPES
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_full_tiles_inside_long_segments(dtype, causal):
    """Segments of 70 and 50 tokens hold whole tiles in every kernel: the unmasked loop runs and matches."""
    B, S, Hq, Hkv, D = 1, 130, 2, 1, 32
    segment_ids = packed_segments(B, S, [70, 50])  # then 10 tokens of padding
    for kernel in ("fwd", "dq", "dkdv"):
        assert full_tile_counts(segment_ids, causal, kernel) > 0, f"{kernel}: the packing reaches no full tile"
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype, seed=1)
    ours, ref = run_both(q, k, v, grad_out, causal=causal, segment_ids=segment_ids)
    assert_matches(ours, ref, dtype)


def test_repeated_ids_get_no_full_tile_across_runs():
    """An id that reappears after another segment: full tiles stay inside one run, the result stays exact."""
    B, S, Hq, Hkv, D = 1, 96, 2, 1, 32
    segment_ids = torch.tensor([[1] * 40 + [2] * 16 + [1] * 40], dtype=torch.int32)
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32, seed=2)
    ours, ref = run_both(q, k, v, grad_out, causal=False, segment_ids=segment_ids)
    assert_matches(ours, ref, torch.float32)


@DTYPES
@pytest.mark.parametrize("lengths", [None, [30, 1, 25]], ids=["unpacked", "packed"])
def test_fused_backward_equals_split(dtype, lengths):
    B, S, Hq, Hkv, D = 2, 61, 4, 2, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype, seed=3)
    segment_ids = None if lengths is None else packed_segments(B, S, lengths)
    split = grads_of(q, k, v, grad_out, segment_ids=segment_ids)
    fused = grads_of(q, k, v, grad_out, segment_ids=segment_ids, fused_backward=True)
    assert torch.equal(split[0], fused[0]) and torch.equal(split[2], fused[2]) and torch.equal(split[3], fused[3])
    _, ref = run_both(q, k, v, grad_out, segment_ids=segment_ids)
    assert_matches(fused, ref, dtype)


def test_launch_grid_puts_batch_heads_on_axis_0():
    """B * H = 70000 exceeds CUDA's 65535 on grid axes y/z: it goes on x (limit 2**31 - 1); tiles on y.
    (Launching 70000 programs under the interpreter would take minutes, so the grid is checked here and
    the kernels run through the same function in every other test.)"""
    assert launch_grid(70_000, 40, 16) == (70_000, 3)
    assert launch_grid(1, 0, 16) == (1, 1)
    with pytest.raises(ValueError, match="split the sequence"):
        launch_grid(1, (MAX_GRID_TILES + 1) * 16, 16)


def test_many_batch_heads_run():
    """B * H = 96 programs per tile column, each head its own values: rows land where they belong."""
    B, S, Hq, Hkv, D = 24, 8, 4, 2, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32, seed=4)
    ours, ref = run_both(q, k, v, grad_out)
    assert_matches(ours, ref, torch.float32)


def test_misaligned_views_are_copied_and_exact():
    """q one element past an aligned start (4 bytes in fp32): aligned() copies it; the result is exact."""
    B, S, Hq, Hkv, D = 1, 20, 2, 1, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32, seed=5)
    storage = torch.empty(q.numel() + 1)
    q_off = storage[1:].view_as(q).copy_(q)
    assert q_off.data_ptr() % 16 != 0
    assert aligned(q_off).data_ptr() % 16 == 0 and torch.equal(aligned(q_off), q)
    assert aligned(q) is q
    ours, ref = run_both(q_off, k, v, grad_out)
    assert_matches(ours, ref, torch.float32)


def test_prepared_segments_must_match_causality():
    q = torch.zeros(1, 8, 1, 32)
    segments = attention_segments(torch.ones(1, 8, dtype=torch.int32), causal=False)
    with pytest.raises(ValueError, match="causal=False"):
        flash_attention(q, q, q, causal=True, segment_ids=segments)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        flash_attention(q, q, q, softmax_scale=-1.0)
