"""Model size and cost without allocating it: parameters per component and training FLOPs per token."""
from __future__ import annotations

from collections import defaultdict

import torch

from engine.config import Config
from engine.model import Transformer


def meta_model(cfg: Config) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg.model)


def parameter_table(cfg: Config) -> dict[str, int]:
    """Parameters per component: embedding, output head (0 when tied), each block part, final norm."""
    model = meta_model(cfg)
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():  # named_parameters skips the tied alias once
        if name.startswith("layers."):
            part = name.split(".")[2]  # attn_norm, attn, mlp_norm, mlp
            counts[f"blocks.{part}"] += p.numel()
        else:
            counts[name.rsplit(".", 1)[0]] += p.numel()
    counts.setdefault("output", 0)
    return dict(counts)


def training_flops_per_token(cfg: Config, seq_len: int | None = None) -> dict[str, float]:
    """6 x (matmul parameters) for forward + backward, plus attention scores and values:
    12 x layers x heads x head_dim x seq_len (PaLM's appendix convention, full S x S counted).
    seq_len defaults to data.seq_len (pretraining rows)."""
    m = cfg.model
    per_layer = (m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)  # q, o and k, v
                 + 3 * m.d_model * m.d_ff)  # gate, up, down
    matmul_params = m.n_layers * per_layer + m.vocab_size * m.d_model  # the output projection
    dense = 6 * matmul_params
    attn = 12 * m.n_layers * m.n_heads * m.head_dim * (seq_len or cfg.data.seq_len)
    return {"dense": float(dense), "attention": float(attn), "total": float(dense + attn)}


def model_info(cfg: Config) -> dict:
    table = parameter_table(cfg)
    blocks = sum(v for k, v in table.items() if k.startswith("blocks."))
    return {
        "parameters": sum(table.values()),
        "blocks_parameters": blocks,
        "components": table,
        "training_flops_per_token": training_flops_per_token(cfg),
        "seq_len": cfg.data.seq_len,
    }
