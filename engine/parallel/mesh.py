"""The device mesh: dp x pp x tp process groups built from torchrun's environment (one rank: no groups)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import Config


@dataclass
class Mesh:
    rank: int = 0
    world_size: int = 1
    dp: int = 1
    pp: int = 1
    tp: int = 1
    dp_rank: int = 0
    pp_rank: int = 0
    tp_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def init_mesh(cfg: Config) -> Mesh:
    device = torch.device("cuda" if cfg.train.device == "cuda" or
                          (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
    return Mesh(device=device)
