"""The device mesh: dp x pp x tp process groups built from torchrun's environment (one process: no groups).

Ranks are laid out as in Megatron-LM, tp innermost, then pp, then dp:
    rank = (dp_rank * pp + pp_rank) * tp + tp_rank
so that a tensor-parallel group (the chattiest) shares a node. Every rank also belongs to one model-parallel
group (its tp x pp ranks: one whole copy of the model), over which the gradient norm is summed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import Config, ConfigError, ParallelConfig

AXES = "dpt"  # data, pipeline, tensor: outermost to innermost


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
    tp_group: dist.ProcessGroup | None = None
    """Ranks holding the shards of the same layers; None on a single process."""
    pp_group: dist.ProcessGroup | None = None
    """Ranks holding consecutive pipeline stages of one model copy."""
    dp_group: dist.ProcessGroup | None = None
    """Ranks holding the same shard of different model copies."""
    mp_group: dist.ProcessGroup | None = None
    """The tp x pp ranks that together hold one whole model copy."""
    timeout_s: float = 300.0
    """How long a collective or a checkpoint rendezvous waits for a peer (parallel.timeout_s)."""

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def resolve_degrees(world_size: int, p: ParallelConfig) -> tuple[int, int, int]:
    """(dp, pp, tp) for this world size: dp = 0 in the config means whatever tp x pp leaves."""
    model_parallel = p.tp * p.pp
    if p.dp == 0:
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel: --parallel.tp={p.tp} x --parallel.pp={p.pp} = {model_parallel} does not divide the "
                f"world size {world_size}; launch a multiple of {model_parallel} processes "
                f"(torchrun --nproc-per-node=... --nnodes=...) or change tp/pp")
        return world_size // model_parallel, p.pp, p.tp
    if p.dp * model_parallel != world_size:
        raise ConfigError(
            f"parallel: --parallel.dp={p.dp} x --parallel.pp={p.pp} x --parallel.tp={p.tp} = "
            f"{p.dp * model_parallel} but the world size is {world_size}; launch that many processes, or set "
            f"--parallel.dp=0 to derive dp from the world size")
    return p.dp, p.pp, p.tp


def coordinates(rank: int, dp: int, pp: int, tp: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank."""
    return rank // (pp * tp), rank // tp % pp, rank % tp


def group_ranks(dp: int, pp: int, tp: int, varying: str) -> list[list[int]]:
    """Every group whose members differ only along the axes in `varying` (letters of "dpt"), in creation order.

    group_ranks(1, 2, 2, "t") == [[0, 1], [2, 3]]; group_ranks(1, 2, 2, "p") == [[0, 2], [1, 3]].
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(dp * pp * tp):
        fixed = tuple(c for c, axis in zip(coordinates(rank, dp, pp, tp), AXES) if axis not in varying)
        groups.setdefault(fixed, []).append(rank)
    return list(groups.values())


def init_mesh(cfg: Config) -> Mesh:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun), initialise torch.distributed when there is more
    than one process (NCCL on CUDA, gloo on CPU) and build this rank's groups. train.device must be resolved
    (engine.config.resolve_auto): cuda means device LOCAL_RANK."""
    if cfg.train.device not in ("cpu", "cuda"):
        raise ValueError(f"init_mesh: train.device={cfg.train.device!r}; resolve the config first "
                         "(engine.config.resolve_auto)")
    env = os.environ
    world_size, rank, local_rank = int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    dp, pp, tp = resolve_degrees(world_size, cfg.parallel)
    device = torch.device("cuda", local_rank) if cfg.train.device == "cuda" else torch.device("cpu")
    if world_size == 1:
        return Mesh(device=device, timeout_s=cfg.parallel.timeout_s)
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with "
                           "torchrun (e.g. torchrun --nproc-per-node=2 -m flan pretrain CONFIG --parallel.tp=2)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A bounded wait: a peer that dies (or hangs) ends every rank's collectives with an error, not a hang.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=cfg.parallel.timeout_s))
    dp_rank, pp_rank, tp_rank = coordinates(rank, dp, pp, tp)
    mesh = Mesh(rank=rank, world_size=world_size, dp=dp, pp=pp, tp=tp, dp_rank=dp_rank, pp_rank=pp_rank,
                tp_rank=tp_rank, device=device, timeout_s=cfg.parallel.timeout_s)
    for field_name, varying in (("tp_group", "t"), ("pp_group", "p"), ("dp_group", "d"), ("mp_group", "pt")):
        # torch requires every rank to take part in creating every group, in the same order.
        for ranks in group_ranks(dp, pp, tp, varying):
            group = dist.new_group(ranks, timeout=timedelta(seconds=cfg.parallel.timeout_s))
            if rank in ranks:
                setattr(mesh, field_name, group)
    return mesh
