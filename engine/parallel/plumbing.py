"""Single-rank versions of the hooks the training loop calls; parallel layouts replace their bodies."""
from __future__ import annotations

import torch

from engine.batch import Batch
from engine.config import Config
from engine.parallel.mesh import Mesh


def parallelize(model: torch.nn.Module, cfg: Config, mesh: Mesh) -> torch.nn.Module:
    return model


def local_batch(batch: Batch, mesh: Mesh) -> Batch:
    return batch


def finalize_grads(model: torch.nn.Module, mesh: Mesh) -> None:
    return None


def clip_grad_norm(model: torch.nn.Module, max_norm: float, mesh: Mesh) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))


def full_state_dict(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}
