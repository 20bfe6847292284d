"""Optimizers and learning-rate schedules: AdamW, or Adafactor as FLAN used for LaMDA-PT; warm-up then cosine
or constant."""
from __future__ import annotations

import math

import torch

from engine.config import Config, OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; gains (1-D) and the embedding are left undecayed, as GPT-2/Llama recipes do."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "tok_embeddings" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "adamw":
        # foreach=False keeps the update a per-parameter loop: identical bits however parameters are grouped
        # or sharded, which the parallel-equality tests rely on.
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    # Adafactor (Shazeer & Stern 2018): factored second moments, the optimizer FLAN tuned with.
    return torch.optim.Adafactor(groups, lr=o.lr, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                 weight_decay=o.weight_decay, foreach=False)


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio or flat."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
