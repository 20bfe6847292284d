"""The opt-in TMA path (flash_attention(tma=True), kernels/attention_io.py) against the fp32 reference.

Triton's interpreter executes tensor-descriptor loads and stores (out-of-range rows read as zeros and
are not written, as on the GPU), so the descriptor path runs here: forward, split and fused backward,
packed and unpacked rows, GQA, lengths that end inside a tile.
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import triton
from triton.runtime import _allocation
from triton.runtime.interpreter import InterpreterBuilder

from kernels import attention
from tests.kernels.test_attention import assert_matches, make_inputs, packed_segments, run_both
from tests.kernels.test_attention_paths import DTYPES, grads_of

LAYOUTS = pytest.mark.parametrize("lengths", [None, [30, 1, 25]], ids=["unpacked", "packed"])


def assert_tma_matches_reference_and_pointers(q, k, v, grad_out, dtype, segment_ids):
    """The TMA path against the fp32 reference and, in fp16, against the pointer path bit for bit (fp16
    products are exact in the interpreter's fp32 dots: the same tiles give the same bits)."""
    pointers, ref = run_both(q, k, v, grad_out, segment_ids=segment_ids)
    ours = grads_of(q, k, v, grad_out, segment_ids=segment_ids, tma=True)
    assert_matches(ours, ref, dtype)
    if dtype == torch.float16:
        for name, a, b in zip(("out", "dq", "dk", "dv"), ours, pointers):
            assert torch.equal(a, b), f"{name}: TMA and pointer paths read different elements"


@DTYPES
@LAYOUTS
def test_tma_path_matches_reference(dtype, lengths):
    B, S, Hq, Hkv, D = 2, 61, 4, 2, 32  # S = 61 ends inside a tile of every kernel
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype, seed=7)
    segment_ids = None if lengths is None else packed_segments(B, S, lengths)
    assert_tma_matches_reference_and_pointers(q, k, v, grad_out, dtype, segment_ids)


@DTYPES
def test_tma_descriptors_span_heads_at_any_stride(dtype):
    """Descriptors cover a batch row's heads (heads x S x D): with (B, H, S, D) storage viewed as
    (B, S, H, D), heads lie S*D apart and rows D apart, the reverse of the usual order, and the
    descriptor path still reads and writes exactly the pointer path's elements (GQA, packed)."""
    B, S, Hq, Hkv, D = 2, 40, 4, 2, 32
    q, k, v, grad_out = (t.transpose(1, 2).contiguous().transpose(1, 2)
                         for t in make_inputs(B, S, Hq, Hkv, D, dtype, seed=11))
    assert q.stride(2) == S * D and q.stride(1) == D
    assert_tma_matches_reference_and_pointers(q, k, v, grad_out, dtype, packed_segments(B, S, [17, 23]))


@DTYPES
def test_tma_fused_backward_not_causal_matches_reference(dtype):
    B, S, Hq, Hkv, D = 1, 50, 2, 1, 64
    q, k, v, grad_out = make_inputs(B, S, Hq, Hkv, D, dtype, seed=8)
    segment_ids = packed_segments(B, S, [20, 22])
    _, ref = run_both(q, k, v, grad_out, causal=False, segment_ids=segment_ids)
    ours = grads_of(q, k, v, grad_out, causal=False, segment_ids=segment_ids, tma=True, fused_backward=True)
    assert_matches(ours, ref, dtype)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_the_flag_chooses_the_descriptor_path(monkeypatch, tma):
    """tma=True makes descriptors in all three kernels (fwd, dK/dV, dQ), once per tensor and program, over
    all heads of a batch row; tma=False none."""
    made = []
    original = InterpreterBuilder.create_make_tensor_descriptor

    def counting(self, *args, **kwargs):
        made.append(args[3])  # the block shape
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_make_tensor_descriptor", counting)
    q, k, v, grad_out = make_inputs(1, 20, 2, 1, 32, torch.float32, seed=9)
    grads_of(q, k, v, grad_out, tma=tma)
    assert bool(made) == tma
    if tma:  # boxes of the interpreter's tiles (32 query rows x 16 keys, dK/dV 16 x 32) by head dim 32
        # One program per query tile and head in fwd and dQ (2 each), one per key tile and kv head in
        # dK/dV (1, looping over the group of 2 query heads): 32-row boxes fwd q, o; dQ q, dO, dQ; dK/dV
        # k, v, dK, dV. 16-row boxes fwd and dQ k, v; dK/dV q, dO once, not once per query head.
        boxes = Counter(tuple(shape) for shape in made)
        assert boxes == {(1, 32, 32): 2 * 2 + 2 * 3 + 4, (1, 16, 32): 2 * 2 + 2 * 2 + 2}


def test_devices_without_tma_are_refused(monkeypatch):
    """An sm_80 GPU with tma=True: one clear error naming the fix (checked without a GPU, on a stand-in)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="sm_80. Pass tma=False"):
        attention._check_device(on_gpu, tma=True)
    attention._check_device(on_gpu, tma=False)


def test_descriptor_scratch_comes_from_torch_and_leaves_the_callers_allocator():
    """With tma, a launch gets scratch from torch on the tensors' device; the caller's Triton allocator
    (a context variable; Triton has no public getter) is the same object afterwards."""
    def callers(size, alignment, stream):
        raise AssertionError("the caller's allocator must not serve the kernels' scratch")

    before = _allocation._allocator.get()
    triton.set_allocator(callers)
    try:
        scratch = attention._launch(lambda: _allocation._allocator.get()(256, 128, None), True, torch.device("cpu"))
        assert scratch.dtype == torch.int8 and scratch.numel() == 256
        assert _allocation._allocator.get() is callers
        assert attention._launch(lambda: _allocation._allocator.get(), False, torch.device("cpu")) is callers
    finally:
        triton.set_allocator(before)
