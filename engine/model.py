"""The plain single-device decoder-only transformer: the truth every parallel layout is tested against.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> RMSNorm -> gated MLP
(SwiGLU or GELU-gated as in LaMDA-PT), a final RMSNorm and a (tied or untied) output head. Rotary positions
come from the Batch, so they restart in every packed segment, and attention never crosses a segment.

This file knows nothing of ranks. Views use -1 for head counts because tensor parallelism shards heads;
forward skips a missing embedding or head so that pipeline stages are made by deleting modules.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.batch import IGNORE_INDEX, Batch
from engine.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too many bits.
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight
        low = autocast_dtype(x)
        if low is not None:
            # Cast once here rather than in each linear it feeds (q, k, v; gate, up): one low-precision copy is
            # kept for backward instead of three, and sequence parallelism gathers half the bytes.
            out = out.to(low)
        return out


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on x's device, None when it is off. A meta tensor has no autocast (the
    query raises for it), so a model built on the meta device runs as if autocast were off."""
    dev = x.device.type
    if dev == "meta" or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def rope_frequencies(cfg: ModelConfig, device=None) -> torch.Tensor:
    """The head_dim/2 rotary frequencies, rescaled for long contexts as config.json's rope_scaling says:
    "linear" divides them all by the factor (position interpolation); "llama3" divides only the low ones
    (wavelength above original_max_len / low_freq_factor), keeps the high ones (below original_max_len /
    high_freq_factor) and blends smoothly in between (Llama 3.1's rule)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        low, high, factor = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = ((cfg.rope_original_max_len / wavelen - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq


def rotary_tables(positions: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, S, 1, head_dim/2) for integer positions (B, S)."""
    angles = positions.float()[..., None] * rope_frequencies(cfg, positions.device)  # (B, S, hd/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, S, H, hd) by the tables; halves layout (first half real, second imaginary) as in Llama/HF."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def segment_mask(q_segments: torch.Tensor, k_segments: torch.Tensor, q_index: torch.Tensor,
                 k_index: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: key visible to query when in the same non-padding segment and not in the future.

    Every query also sees itself so that padding rows never softmax over nothing (their output is zeroed).
    """
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        same &= k_index[None, None, :] <= q_index[None, :, None]
    if q_index.shape == k_index.shape:
        same |= torch.eye(len(q_index), dtype=torch.bool, device=same.device)[None]
    return same[:, None]


def attention_torch(q, k, v, segment_ids, *, causal=True, q_segment_ids=None, q_offset=0):
    """PyTorch attention over (B, S, H, hd) tensors with an explicit segment mask; never crosses a segment.

    q_segment_ids/q_offset serve decoding with a KV cache, where the queries are the last Sq of Sk keys.
    """
    Sq, Sk = q.shape[1], k.shape[1]
    q_seg = segment_ids[:, -Sq:] if q_segment_ids is None else q_segment_ids
    q_index = torch.arange(q_offset, q_offset + Sq, device=q.device)
    k_index = torch.arange(Sk, device=q.device)
    mask = segment_mask(q_seg, segment_ids, q_index, k_index, causal)
    if Sq != Sk:  # decoding: a query always sees its own (just cached) key
        mask |= (k_index[None, :] == q_index[:, None])[None, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2],
    ).transpose(1, 2)  # (B, Sq, H, hd)
    return out * (q_seg != 0)[:, :, None, None].to(out.dtype)


def attention(q, k, v, segment_ids, impl: str, tiles: str, backward: str):
    """The one attention entry point of the model: the Triton flash kernel or the PyTorch path.

    For "triton", segment_ids is what `attention_masking` prepared: None or the kernel's segments; tiles and
    backward are ModelConfig.attention_tiles and attention_backward."""
    if impl == "triton":
        from kernels.attention import flash_attention

        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, tma=tiles == "tma",
                               fused_backward=backward == "fused")
    return attention_torch(q, k, v, segment_ids)


def attention_masking(batch: Batch, impl: str, cache: "KVCache | None"):
    """What every layer's attention masks with, prepared once per batch.

    The Triton kernel gets None for an unpacked batch (no segment mask to pay) and otherwise the
    segments with their tile bounds, computed here once rather than in every layer; the PyTorch path
    and decoding with a cache take the ids themselves.
    """
    if impl != "triton" or cache is not None:
        return batch.segment_ids
    if not batch.packed:
        return None
    from kernels.attention import attention_segments

    return attention_segments(batch.segment_ids, causal=True)


@dataclass
class KVCache:
    """Keys and values of every layer so far, for greedy decoding (B rows, left-padded with segment 0)."""

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    segment_ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.segment_ids is None else self.segment_ids.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.impl, self.tiles, self.backward = cfg.attention, cfg.attention_tiles, cfg.attention_backward
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, rope, segment_ids, cache: KVCache | None = None, name: str = ""):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim)  # (B, S, nh, hd)
        k = self.wk(x).view(B, S, -1, self.head_dim)  # (B, S, nkv, hd)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            out = attention(q, k, v, segment_ids, self.impl, self.tiles, self.backward)
        else:
            offset = cache.length
            if offset:
                k = torch.cat([cache.keys[name], k], dim=1)
                v = torch.cat([cache.values[name], v], dim=1)
            cache.keys[name], cache.values[name] = k, v
            all_segments = segment_ids if offset == 0 else torch.cat([cache.segment_ids, segment_ids], dim=1)
            out = attention_torch(q, k, v, all_segments, q_segment_ids=segment_ids, q_offset=offset)
        return self.wo(out.reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = F.silu if cfg.mlp == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, segment_ids, cache=None, name=""):
        x = x + self.attn(self.attn_norm(x), rope, segment_ids, cache, name)
        return x + self.mlp(self.mlp_norm(x))


class OutputHead(nn.Module):
    """Projection to the vocabulary and the next-token loss; tensor parallelism swaps in a vocab-parallel twin."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.impl = cfg.loss

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)

    def loss(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over the non-ignored labels; "sum" lets the loop normalise by a global token count."""
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        impl = self.impl
        if impl == "fused":
            from kernels.cross_entropy import linear_cross_entropy

            # The kernel takes one dtype: under autocast, the autocast dtype (fp32 master weights are cast).
            dtype = autocast_dtype(h) or h.dtype
            return linear_cross_entropy(h.to(dtype), self.weight.to(dtype), labels, reduction=reduction)
        logits = self(h)
        if impl == "triton":
            from kernels.cross_entropy import cross_entropy

            # The logits are read by nothing else: their gradient may overwrite them (1x logits memory).
            return cross_entropy(logits, labels, reduction=reduction, inplace=True)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        if reduction == "sum":
            return loss
        return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # A dict keeps "layers.<i>" names stable when pipeline stages delete the layers they do not own.
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = OutputHead(cfg)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, batch: Batch, hidden: torch.Tensor | None = None, *, cache: KVCache | None = None,
                loss_reduction: str = "mean", return_hidden: bool = False) -> torch.Tensor:
        """Logits (B, S, V), or the loss when batch.labels is set.

        A pipeline stage without the embedding takes `hidden` (B, S, d) instead of tokens; one without the
        final norm returns its hidden states. `return_hidden` stops after the final norm, for callers that
        need logits at a few positions only (the scorer applies `self.output` to the last one).
        """
        h = self.tok_embeddings(batch.tokens) if hidden is None else hidden
        positions = batch.positions
        if cache is not None and cache.segment_ids is not None:
            positions = positions + cache_positions(cache, batch)
        rope = rotary_tables(positions, self.cfg)
        masking = attention_masking(batch, self.cfg.attention, cache)
        for name, layer in self.layers.items():
            h = layer(h, rope, masking, cache, name)
        if cache is not None:
            cache.segment_ids = batch.segment_ids if cache.segment_ids is None else torch.cat(
                [cache.segment_ids, batch.segment_ids], dim=1)
        if self.norm is None:
            return h
        h = self.norm(h)
        if return_hidden:
            return h
        if batch.labels is None:
            return self.output(h)
        return self.output.loss(h, batch.labels, loss_reduction)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """The seeded initial values (`initial_region`) of every parameter, whole."""
        for name, p in self.named_parameters():
            p.copy_(initial_region(self.cfg, name, tuple(p.shape), tuple((0, n) for n in p.shape), seed))


INIT_BLOCK_ELEMENTS = 1 << 22
"""Elements per generator block of a parameter's initial values (16 MiB of fp32): the most a shard-first build
(engine/build.py) holds beyond its shards."""


def _block_generator(seed: int, name: str, block: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def initial_region(cfg: ModelConfig, name: str, shape: tuple[int, ...], box, seed: int) -> torch.Tensor:
    """The `box` region ((start, stop) per dim) of global parameter `name` of `shape` at initialisation (fp32).

    GPT-2/Llama init: RMSNorm gains 1, everything else N(0, std), residual output projections scaled by
    1/sqrt(2 n_layers). The values depend only on (seed, name): rows are drawn in blocks of about
    INIT_BLOCK_ELEMENTS, each from its own generator seeded by (seed, name, block), so that any layout's slice
    is drawn without the rest of the tensor and every layout starts from the single-device weights.
    """
    region = tuple(b - a for a, b in box)
    if len(shape) == 1:
        return torch.ones(region)
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else cfg.init_std
    row = math.prod(shape[1:])
    per_block = max(1, INIT_BLOCK_ELEMENTS // row)
    (r0, r1), rest = box[0], tuple(slice(a, b) for a, b in box[1:])
    out = torch.empty(region)
    for block in range(r0 // per_block, (r1 - 1) // per_block + 1):
        b0, b1 = block * per_block, min((block + 1) * per_block, shape[0])
        values = torch.randn((b1 - b0, *shape[1:]), generator=_block_generator(seed, name, block))
        lo, hi = max(b0, r0), min(b1, r1)
        out[lo - r0:hi - r0] = values[(slice(lo - b0, hi - b0), *rest)]
    return out.mul_(std)


def cache_positions(cache: KVCache, batch: Batch) -> torch.Tensor:
    """Offsets for new tokens: how many tokens of their own segment each row already has in the cache."""
    seen = (cache.segment_ids != 0).sum(dim=1, keepdim=True).to(batch.positions.dtype)
    return seen.expand_as(batch.positions)


def build_model(cfg: ModelConfig, seed: int, device: str | torch.device = "cpu") -> Transformer:
    """Build on the meta device, materialise on `device`, and initialise once from the seed."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty re-creates parameters: restore the sharing
        model.output.weight = model.tok_embeddings.weight
    model.init_weights(seed)
    return model
