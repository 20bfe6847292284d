"""flash_attention against attention_reference under Triton's CPU interpreter (fp32 and fp16).

Error measure: relative Frobenius error ||ours - ref|| / ||ref|| (see `relative_error`), the reference
computed in float32 from the same (possibly fp16) inputs. Tolerances from the issue: 1e-5 in fp32, 2e-3 in fp16.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.attention import attention_backward, attention_forward, attention_segments, flash_attention
from kernels.attention_reference import attention_mask, attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def packed_segments(batch: int, seq_len: int, lengths: list[int]) -> torch.Tensor:
    """(B, S) int32 ids: every row packs `lengths` as segments 1, 2, ... (cut at S) and pads the rest with 0."""
    row = torch.zeros(seq_len, dtype=torch.int32)
    start = 0
    for seg_id, length in enumerate(lengths, start=1):
        row[start:start + length] = seg_id
        start += length
    return row.expand(batch, seq_len).contiguous()


def make_inputs(B, S, Hq, Hkv, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, h, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    grad_out = torch.randn(B, S, Hq, D, generator=gen).to(dtype)  # upstream gradient != 1
    return q, k, v, grad_out


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref||; the denominator is floored at an RMS of 0.1 so that gradients which are
    exactly zero in theory (a single-token segment's dq) are judged on absolute rounding noise."""
    floor = 0.1 * ref.numel() ** 0.5
    return ((ours.float() - ref).norm() / ref.norm().clamp_min(floor)).item()


def run_both(q, k, v, grad_out, **kwargs):
    """(out, dq, dk, dv) of the kernel and of the fp32 reference on the same inputs."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, **kwargs)
    ours = (out, *torch.autograd.grad(out, leaves, grad_out))
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref_out = attention_reference(*ref_leaves, **kwargs)
    ref = (ref_out, *torch.autograd.grad(ref_out, ref_leaves, grad_out.float()))
    return ours, ref


def assert_matches(ours, ref, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {tuple(b.shape)}"
        err = relative_error(a, b)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


FIXED_CASES = {
    # name: (B, S, Hq, Hkv, D, causal, segment lengths or None)
    "plain-causal-S-not-multiple": (1, 45, 2, 2, 32, True, None),
    "full-attention-gqa2": (2, 37, 4, 2, 32, False, None),
    "gqa4-one-kv-head": (1, 50, 4, 1, 64, True, None),
    "padding-at-row-end": (2, 40, 2, 1, 32, True, [12, 9]),
    "many-short-segments": (1, 72, 2, 2, 32, True, [3, 1, 7, 5, 2, 9, 4, 6, 1, 8, 11, 15]),
    "segment-of-length-one-and-padding": (1, 33, 2, 1, 64, True, [1, 20, 1]),
    "segments-not-causal": (2, 48, 4, 2, 32, False, [17, 5, 20]),
    "single-token": (2, 1, 2, 1, 32, True, [1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", FIXED_CASES.values(), ids=FIXED_CASES.keys())
def test_matches_reference_on_fixed_cases(case, dtype):
    B, S, Hq, Hkv, D, causal, lengths = case
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype)
    segment_ids = None if lengths is None else packed_segments(B, S, lengths)
    ours, ref = run_both(q, k, v, grad_out, causal=causal, segment_ids=segment_ids)
    assert_matches(ours, ref, dtype)


@st.composite
def attention_problems(draw):
    B = draw(st.integers(1, 2))
    S = draw(st.integers(1, 80))
    Hkv, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]))
    D = draw(st.sampled_from([32, 64]))
    causal = draw(st.booleans())
    segment_ids = None
    if draw(st.booleans()):  # each row its own packing: segments 1..n, then padding if they fall short
        segment_ids = torch.cat([packed_segments(1, S, draw(st.lists(st.integers(1, S), min_size=1, max_size=6)))
                                 for _ in range(B)])
    return B, S, Hkv * group, Hkv, D, causal, segment_ids, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@settings(max_examples=10, deadline=None)
@given(problem=attention_problems())
def test_matches_reference_on_random_layouts(problem, dtype):
    B, S, Hq, Hkv, D, causal, segment_ids, seed = problem
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype, seed)
    ours, ref = run_both(q, k, v, grad_out, causal=causal, segment_ids=segment_ids)
    assert_matches(ours, ref, dtype)


def test_padding_gives_exact_zeros():
    B, S, Hq, Hkv, D = 1, 40, 2, 1, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32)
    segment_ids = packed_segments(B, S, [15, 10])  # tokens 25.. are padding
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, segment_ids=segment_ids)
    dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t[:, 25:], torch.zeros_like(t[:, 25:])), f"{name} is not exactly 0 on padding"
        assert t[:, :25].abs().sum() > 0, f"{name} is 0 on real tokens too"


def test_poisoned_outputs_are_fully_overwritten():
    """Every element of out, dq, dk, dv is written: padding rows and partial tiles included."""
    B, S, Hq, Hkv, D = 2, 37, 4, 2, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32)
    segment_ids = packed_segments(B, S, [5, 1, 20])
    scale = D ** -0.5
    segments = attention_segments(segment_ids, causal=True)
    seg = dict(causal=True, segment_ids=segments.ids, bounds=segments.bounds, softmax_scale=scale)
    out = torch.full_like(q, float("nan"))
    out, lse = attention_forward(q, k, v, out=out, **seg)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    grads = attention_backward(grad_out, q, k, v, out, lse, grads=grads, **seg)
    ours = (out, *grads)
    _, ref = run_both(q, k, v, grad_out, causal=True, segment_ids=segment_ids)
    for name, t in zip(("out", "dq", "dk", "dv"), ours):
        assert not t.isnan().any(), f"{name} still holds NaN after the call"
    assert_matches(ours, ref, torch.float32)


def test_strided_inputs_and_custom_scale():
    """Views of one fused projection (non-contiguous along S and H) and a non-default softmax scale."""
    B, S, Hq, Hkv, D = 1, 30, 2, 1, 32
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(B, S, Hq + 2 * Hkv, D, generator=gen)
    q, k, v = fused.split([Hq, Hkv, Hkv], dim=2)
    grad_out = torch.randn(B, S, Hq, D, generator=gen)
    ours, ref = run_both(q, k, v, grad_out, causal=True, softmax_scale=0.3)
    assert_matches(ours, ref, torch.float32)


def test_segment_bounds_are_tight_for_packed_rows_and_safe_for_any_ids():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 2, 2, 5, -1, 9, 9]], dtype=torch.int32)
    bounds = attention_segments(seg, causal=True).bounds  # (B, side, [lo, hi, full_lo, full_hi], S)
    # Row 0 is packed (contiguous increasing ids, padding at the end): visit and full ranges coincide.
    assert bounds[0, 0, :2].tolist() == [[0, 0, 0, 3, 3, 5, 8, 8], [1, 2, 3, 4, 5, 6, 0, 0]]
    assert bounds[0, 1, :2].tolist() == [[0, 1, 2, 3, 4, 5, 8, 8], [3, 3, 3, 5, 5, 6, 0, 0]]
    assert torch.equal(bounds[0, :, 2:], bounds[0, :, :2])
    # Row 1 repeats id 5 in two runs: the visit range spans both, the full range only the token's own run.
    assert bounds[1, 1, :, 0].tolist() == [0, 5, 0, 2]
    # Any ids (repeated runs, negative, larger than S): every allowed pair lies inside the visit range,
    # and every pair inside the full range is allowed.
    for causal in (True, False):
        bounds = attention_segments(seg, causal=causal).bounds
        allowed = attention_mask(seg.shape[1], causal=causal, segment_ids=seg, device="cpu")
        b, i, j = allowed.nonzero(as_tuple=True)
        assert ((bounds[b, 0, 0, i] <= j) & (j < bounds[b, 0, 1, i])).all()
        assert ((bounds[b, 1, 0, j] <= i) & (i < bounds[b, 1, 1, j])).all()
        idx = torch.arange(seg.shape[1])
        for side in (0, 1):
            inside = (bounds[:, side, 2, :, None] <= idx) & (idx < bounds[:, side, 3, :, None])  # (B, token, other)
            pairs = inside if side == 0 else inside.transpose(1, 2)  # as (B, query, key)
            assert (allowed[pairs.nonzero(as_tuple=True)]).all(), f"side {side}, causal={causal}"


def test_arbitrary_segment_ids_still_exact():
    """Repeated, unordered and out-of-range ids: skipping widens, the mask keeps the result exact."""
    B, S, Hq, Hkv, D = 1, 24, 2, 1, 32
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, torch.float32)
    segment_ids = torch.tensor([[3, 3, 1, 1, 1, 3, 3, 0, 0, 7, 7, 7, 99, 99, -2, -2, 1, 1, 0, 4, 4, 4, 4, 0]],
                               dtype=torch.int32)
    ours, ref = run_both(q, k, v, grad_out, causal=True, segment_ids=segment_ids)
    assert_matches(ours, ref, torch.float32)


@pytest.mark.parametrize("bad, message", [
    (dict(D=48), "head dim D=48 is not supported"),
    (dict(Hq=3, Hkv=2), "multiple of key/value heads"),
    (dict(k_dtype=torch.float16), "share one dtype"),
    (dict(segment_shape=(1, 7)), "segment_ids must be an integer"),
])
def test_rejects_unsupported_inputs_with_a_clear_message(bad, message):
    D, Hq, Hkv = bad.get("D", 32), bad.get("Hq", 2), bad.get("Hkv", 1)
    q = torch.zeros(1, 8, Hq, D)
    k = torch.zeros(1, 8, Hkv, D, dtype=bad.get("k_dtype", torch.float32))
    v = torch.zeros(1, 8, Hkv, D, dtype=bad.get("k_dtype", torch.float32))
    segment_ids = torch.ones(bad["segment_shape"], dtype=torch.int32) if "segment_shape" in bad else None
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention(q, k, v, segment_ids=segment_ids)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 8, 1, 32)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        flash_attention(x, x, x)
