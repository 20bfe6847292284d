"""`flan memory`: one rank's peak memory in a training step of the real engine code, beside `flan plan`'s figure.

    flan memory configs/flan-137b.toml                  # rank 0 of the preset's whole world (tp x pp x dp)
    flan memory configs/flan-137b.toml --rank 120 --json
    flan memory configs/flan-137b.toml --all-stages     # tp rank 0 of every pipeline stage

Nothing is allocated and no other rank runs (engine/memory.py: fake tensors, a fake process group); GPU
presets are measured as they resolve on a GPU, with the PyTorch attention and loss paths.
"""
from __future__ import annotations

import json

from engine.config import ConfigError, load_config
from engine.memory import CATEGORIES, MemoryReport, dry_run, world_size
from engine.planner import BF16_TORCH_PATHS, FP32_CPU, GiB, config_layout, rank_bytes


def planned(cfg, report: MemoryReport) -> float:
    """flan plan's bytes for the report's pipeline rank (the same precision and kernel paths as measured)."""
    precision = BF16_TORCH_PATHS if cfg.train.precision in ("bf16", "auto") else FP32_CPU
    return rank_bytes(cfg, config_layout(cfg), report.coordinates["pp"], precision)["total"]


def report_dict(cfg, report: MemoryReport) -> dict:
    return {"rank": report.rank, **{f"{k}_rank": v for k, v in report.coordinates.items()},
            "peak_bytes": report.peak_bytes, "planned_bytes": planned(cfg, report),
            "categories": report.categories, "seconds": report.seconds}


def cmd_memory(args) -> int:
    cfg = load_config(args.config, args.overrides)
    size = world_size(cfg)
    if args.rank is not None and not 0 <= args.rank < size:
        raise ConfigError(f"--rank {args.rank}: {args.config}'s layout has {size} ranks; give 0..{size - 1}")
    ranks = [r * cfg.parallel.tp for r in range(cfg.parallel.pp)] if args.all_stages else [args.rank or 0]
    rows = [report_dict(cfg, dry_run(cfg, rank)) for rank in ranks]
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else {"config": args.config, "stages": rows}, indent=1))
        return 0
    print(f"{args.config}: {size} ranks (dp x pp x tp), one training step on fake tensors; GiB")
    header = ["rank", "pp", "tp", *CATEGORIES, "peak", "planned", "plan/peak"]
    print("  ".join(f"{h:>11}" for h in header))
    for r in rows:
        cells = [r["rank"], r["pp_rank"], r["tp_rank"], *(r["categories"][c] / GiB for c in CATEGORIES),
                 r["peak_bytes"] / GiB, r["planned_bytes"] / GiB, r["planned_bytes"] / r["peak_bytes"]]
        print("  ".join(f"{c:>11.2f}" if isinstance(c, float) else f"{c:>11}" for c in cells))
    return 0


def add_memory_commands(subparsers) -> None:
    """Register `flan memory` on the `flan` command line's subparsers."""
    p = subparsers.add_parser("memory", help="one rank's peak memory in a real training step (fake tensors)")
    p.add_argument("config", help="TOML config, e.g. configs/flan-137b.toml")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rank", type=int, help="global rank to measure (default 0)")
    which.add_argument("--all-stages", action="store_true", help="tp rank 0 of every pipeline stage")
    p.add_argument("--json", action="store_true", help="one JSON object (--all-stages: {'stages': [...]})")
    p.set_defaults(func=cmd_memory)
