"""Flash attention in Triton: causal, packed segments, grouped-query heads, forward and backward.

    out = flash_attention(q, k, v, causal=True, segment_ids=segments)   # q (B,S,Hq,D), k/v (B,S,Hkv,D)

The algorithm is FlashAttention-2 (Dao, 2023); the kernels live in kernels/attention_fwd.py and
kernels/attention_bwd.py, the tile ranges and segment bounds in kernels/attention_tiles.py, the autotune
lists in kernels/attention_configs.py. This file holds the host side: checks, launches, the torch.library
custom ops (with fake implementations, so fake and meta tensors and torch.compile trace through them)
and the public function.

Masking, cheapest first:
  * no segment ids (an unpacked batch): only causality, and every tile below the diagonal runs unmasked;
  * segment ids (packed rows): a query sees keys of its own segment id, at or before it when causal; id 0
    is padding and attends to nothing (zero output and gradients). Tiles that cannot hold an allowed pair
    are skipped, tiles wholly inside one run of one id run unmasked, the others are masked exactly.
    Pass `attention_segments(ids)` instead of the ids to compute the bounds once for many layers.

GQA: a query head h reads key/value head h // (Hq / Hkv) through strides, never a repeated copy; the
dK/dV program of a key/value head loops over the query heads of its group, so it needs no atomics.
Backward: the deterministic split (dK/dV, then dQ) by default; `fused_backward=True` adds dQ by fp32
atomics inside the dK/dV kernel instead (kernels/attention_bwd.py says when that may pay).
Tiles move through pointers by default; `tma=True` moves them through Hopper's TMA tensor descriptors
(kernels/attention_io.py), opt-in until a GPU measures which is faster.
"""
from __future__ import annotations

import contextvars
import math

import torch
import triton

from kernels.attention_bwd import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from kernels.attention_configs import interpreting
from kernels.attention_fwd import attn_fwd_kernel
from kernels.attention_reference import attention_reference
from kernels.attention_tiles import AttentionSegments, attention_segments, launch_grid

__all__ = ["flash_attention", "attention_reference", "attention_segments", "AttentionSegments",
           "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e))
ALIGN_BYTES = 16  # Triton specialises pointers and strides divisible by 16: vector loads, cp.async, TMA
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DELTA_BLOCK_M = 64  # rows per program of the tiny rowsum kernel; any power of two works


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments) -> None:
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
    if segments is not None:
        if segments.ids.shape != (B, S):
            raise ValueError(f"flash_attention: segment_ids must be an integer (B, S) = ({B}, {S}) tensor; got "
                             f"{tuple(segments.ids.shape)}")
        if segments.ids.device != q.device:
            raise ValueError(f"flash_attention: segment_ids is on {segments.ids.device} but q on {q.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(1) * S >= 2**31:  # in-kernel row offsets are 32-bit; batch and head offsets are 64-bit
            raise ValueError(f"flash_attention: {name} spans {t.stride(1) * S} elements along S, over the 2**31 "
                             f"the kernel's row offsets address; split the batch along S or heads")


def _check_device(q: torch.Tensor, tma: bool) -> None:
    """Called where the kernels are about to run on real tensors (inside the ops, so traced code never
    reads the interpreter setting or the device's capability)."""
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"flash_attention: tensors are on {q.device}; the Triton kernel needs a CUDA device, or "
                           f"TRITON_INTERPRET=1 (Triton's slow CPU interpreter, for tests). On CPU use "
                           f"attention_reference, i.e. the model's attention='torch'")
    if tma and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
        major, minor = torch.cuda.get_device_capability(q.device)
        raise ValueError(f"flash_attention: tma=True needs TMA (sm_90, Hopper, or newer); {q.device} is "
                         f"sm_{major}{minor}. Pass tma=False (the pointer path)")


def _launch(launch, tma: bool, device: torch.device):
    """Run `launch()`; with tma, under a Triton allocator giving torch memory on `device`, into which the
    kernels write the tensor descriptors they make. That is set in a copy of the current context, so the
    caller's own allocator setting (a context variable) is left as it was."""
    if not tma:
        return launch()

    def run():
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        return launch()
    return contextvars.copy_context().run(run)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its pointer and B/S/H strides are 16-byte aligned with unit stride along D, else an
    aligned contiguous copy. Misaligned views (a slice of a fused projection at an odd offset, say) would
    still be correct, but Triton would compile them without vector loads: one copy is cheaper."""
    size = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % ALIGN_BYTES == 0 and all(
        (s * size) % ALIGN_BYTES == 0 for s, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE products (tf32 would miss the 1e-5 fp32 tolerance); fp16/bf16 ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _segment_args(ids: torch.Tensor | None, bounds: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The SEG and BOUNDS kernel arguments; without segments a dummy the kernels never read (HAS_SEGMENTS=False)."""
    if ids is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        return dummy, dummy
    return ids, bounds


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      segment_ids: torch.Tensor | None, bounds: torch.Tensor | None, softmax_scale: float,
                      out: torch.Tensor | None = None, tma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns (out (B,S,Hq,D), lse (B,Hq,S) fp32 log2-sum-exp).

    segment_ids (B,S) int32 and bounds (B,2,4,S) int32 (`attention_segments`), or both None. `out`, when
    given, is written in place (every element, padding included). tma: tiles through TMA descriptors
    (inputs `aligned`, 16-byte strides; sm_90).
    """
    B, S, Hq, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    seg, bnd = _segment_args(segment_ids, bounds, q.device)
    _launch(lambda: attn_fwd_kernel[lambda meta: launch_grid(B * Hq, S, meta["BLOCK_A"])](
        q, k, v, out, lse, seg, bnd,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        S, Hq, Hq // k.shape[2], softmax_scale * LOG2E, triton.next_power_of_2(S),
        HEAD_DIM=D, CAUSAL=causal, HAS_SEGMENTS=segment_ids is not None, DOT_PRECISION=_dot_precision(q.dtype),
        TMA=tma), tma, q.device)
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, *, causal: bool, segment_ids: torch.Tensor | None,
                       bounds: torch.Tensor | None, softmax_scale: float, fused: bool = False,
                       grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, tma: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels; returns (dq, dk, dv), written into `grads` when given.

    fused=False: delta, dK/dV, dQ (deterministic). fused=True: delta, dK/dV with dQ by fp32 atomics
    into a (B,Hq,S,D) buffer, then one scale-and-cast into dq. tma as in `attention_forward`.
    """
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    if grads is None:
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq, dk, dv = grads
    delta = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    attn_bwd_delta_kernel[launch_grid(B * Hq, S, _DELTA_BLOCK_M)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], S, Hq, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)
    seg, bnd = _segment_args(segment_ids, bounds, q.device)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, HAS_SEGMENTS=segment_ids is not None,
                 DOT_PRECISION=_dot_precision(q.dtype), TMA=tma)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scales = (softmax_scale * LOG2E, softmax_scale, triton.next_power_of_2(S))
    # The autotuner zeroes DQ_ACC before each timing run (reset_to_zero): unfused, a 1-element dummy.
    dq_acc = torch.zeros(B, Hq, S, D, dtype=torch.float32, device=q.device) if fused else lse.new_zeros(1)
    _launch(lambda: attn_bwd_dkdv_kernel[lambda meta: launch_grid(B * Hkv, S, meta["BLOCK_B"])](
        q, k, v, do, dk, dv, lse, delta, dq_acc, seg, bnd, *strides, *dk.stride()[:3],
        S, Hkv, Hq // Hkv, *scales, FUSED_DQ=fused, **flags), tma, q.device)
    if fused:
        dq.copy_((dq_acc * softmax_scale).transpose(1, 2))
    else:
        _launch(lambda: attn_bwd_dq_kernel[lambda meta: launch_grid(B * Hq, S, meta["BLOCK_A"])](
            q, k, v, do, dq, lse, delta, seg, bnd, *strides, *dq.stride()[:3], S, Hq, Hq // Hkv, *scales,
            **flags), tma, q.device)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, with fake implementations that give shapes without running.
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("flan::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor | None,
            bounds: torch.Tensor | None, causal: bool, softmax_scale: float,
            tma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(q, tma)
    q, k, v = (aligned(t) for t in (q, k, v))
    return attention_forward(q, k, v, causal=causal, segment_ids=segment_ids, bounds=bounds,
                             softmax_scale=softmax_scale, tma=tma)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, segment_ids, bounds, causal, softmax_scale, tma):
    B, S, Hq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, Hq, S, dtype=torch.float32)


@torch.library.custom_op("flan::flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, segment_ids: torch.Tensor | None, bounds: torch.Tensor | None, causal: bool,
            softmax_scale: float, fused: bool, tma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v = (aligned(t) for t in (do, q, k, v))
    return attention_backward(do, q, k, v, out, lse, causal=causal, segment_ids=segment_ids, bounds=bounds,
                              softmax_scale=softmax_scale, fused=fused, tma=tma)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, segment_ids, bounds, causal, softmax_scale, fused, tma):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves O and the log-sum-exp; backward recomputes P from them."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, segment_ids, bounds, softmax_scale: float, fused_backward: bool,
                tma: bool):
        out, lse = _fwd_op(q, k, v, segment_ids, bounds, causal, softmax_scale, tma)
        ctx.save_for_backward(q, k, v, out, lse, segment_ids, bounds)
        ctx.causal, ctx.softmax_scale, ctx.fused, ctx.tma = causal, softmax_scale, fused_backward, tma
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward kernels are not themselves differentiable
    def backward(ctx, do):
        q, k, v, out, lse, segment_ids, bounds = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, out, lse, segment_ids, bounds, ctx.causal, ctx.softmax_scale,
                             ctx.fused, ctx.tma)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    segment_ids: torch.Tensor | AttentionSegments | None = None, softmax_scale: float | None = None,
                    fused_backward: bool = False, tma: bool = False) -> torch.Tensor:
    """Differentiable softmax(q k^T * scale + mask) v without any S x S tensor.

    q (B, S, Hq, D), k and v (B, S, Hkv, D) with Hq a multiple of Hkv and D in 32/64/128; one dtype
    among float16, bfloat16, float32. causal: query i sees keys j <= i. segment_ids (B, S) integer,
    1..n per packed example and 0 for padding, or their `attention_segments` (bounds computed once for
    many calls): a query sees only keys of its own segment, and padding rows get zero output and zero
    gradients; None (unpacked rows) masks nothing but causality. softmax_scale > 0 defaults to D ** -0.5.
    fused_backward: dQ by fp32 atomics in the dK/dV kernel (not bitwise reproducible); default the
    deterministic split. tma: tiles through TMA tensor descriptors (sm_90 or newer, or the interpreter);
    default the pointer path, until a GPU measures which is faster. Returns (B, S, Hq, D).
    """
    if segment_ids is not None and not isinstance(segment_ids, AttentionSegments):
        segment_ids = attention_segments(segment_ids, causal)
    if segment_ids is not None and segment_ids.causal != causal:
        raise ValueError(f"flash_attention: segments were prepared with causal={segment_ids.causal} but the call "
                         f"has causal={causal}; pass attention_segments(ids, causal={causal})")
    _check_inputs(q, k, v, segment_ids)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):  # the kernels take the row max on unscaled scores
        raise ValueError(f"flash_attention: softmax_scale={softmax_scale} must be finite and > 0")
    ids, bounds = (None, None) if segment_ids is None else (segment_ids.ids, segment_ids.bounds)
    return FlashAttentionFunction.apply(q, k, v, causal, ids, bounds, scale, bool(fused_backward), bool(tma))
