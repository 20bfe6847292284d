"""Plain-PyTorch attention with an explicit mask: the truth the Triton flash kernel is tested against.

It materialises the full (B, Hq, S, S) score matrix, so it is for tests and small shapes only.
"""
from __future__ import annotations

import torch


def attention_mask(seq_len: int, *, causal: bool, segment_ids: torch.Tensor | None,
                   device: torch.device | str) -> torch.Tensor:
    """Boolean (B or 1, S, S) mask, True where query i may attend to key j.

    Causal: j <= i. Segments: same segment id and not padding (id 0), so padding rows attend to nothing.
    """
    idx = torch.arange(seq_len, device=device)
    allowed = (idx[None, :] <= idx[:, None]) if causal else torch.ones(seq_len, seq_len, dtype=torch.bool,
                                                                          device=device)
    allowed = allowed[None]  # (1, S, S)
    if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
        allowed = allowed & (seg_q == seg_k) & (seg_q != 0)  # (B, S, S)
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        segment_ids: torch.Tensor | None = None,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float32, returned in q's dtype; same signature as flash_attention.

    q (B, S, Hq, D), k and v (B, S, Hkv, D) with Hq a multiple of Hkv (each key/value head serves
    Hq / Hkv consecutive query heads); segment_ids (B, S), 0 = padding. Rows that may attend to nothing
    (padding) give zero output and zero gradients.
    """
    B, S, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    qf = q.float().transpose(1, 2)  # (B, Hq, S, D)
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)  # (B, Hq, S, D)
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)  # (B, Hq, S, D)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, Hq, S, S)
    allowed = attention_mask(S, causal=causal, segment_ids=segment_ids, device=q.device)[:, None]  # (B|1, 1, S, S)
    # A finite fill keeps fully masked rows finite (uniform) instead of NaN; multiplying by the mask then
    # zeroes them, and their gradients, exactly.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * allowed
    return (probs @ vf).transpose(1, 2).to(q.dtype)  # (B, S, Hq, D)
