"""`flan plan`: the layouts a config can train with on N GPUs, their memory per GPU and estimated step time.

    flan plan configs/flan-137b.toml --gpus 256 --gpu-memory 80GiB
    flan plan configs/flan-137b.toml --gpus 1024 --gpu-memory 80GiB --json > plans.json
    flan plan configs/gpu-125m.toml --gpus 8 --hardware a100 --train.batch_size=256

The formulas and their assumptions are in engine/planner.py's docstring.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, replace

from engine.config import load_config
from engine.planner import GiB, HARDWARE, Plan, enumerate_plans

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024, "mib": 1024 ** 2, "gib": GiB,
          "tib": 1024 ** 4}


def parse_bytes(text: str) -> float:
    """'80GiB', '80 GB', '8.5e10' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"--gpu-memory {text!r}: write a size such as 80GiB, 40GB or 8.5e10 "
                                         f"(units: {', '.join(u for u in _UNITS if u)})")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give a positive whole number of GPUs")
    return int(text)


def _row(p: Plan) -> dict:
    lay = p.layout
    return {"dp": lay.dp, "pp": lay.pp, "tp": lay.tp, "schedule": lay.schedule + (f"x{lay.virtual_stages}"
            if lay.virtual_stages > 1 else ""), "m": lay.microbatches, "rows/mb": p.microbatch_rows,
            "zero": lay.zero, "recomp": lay.recompute,
            "weights": p.weights_bytes / GiB, "grads": p.grads_bytes / GiB, "optim": p.optimizer_bytes / GiB,
            "activ": p.activations_bytes / GiB, "total": p.total_bytes / GiB, "step_s": p.step_s, "mfu": p.mfu}


def format_table(plans: list[Plan]) -> str:
    rows = [_row(p) for p in plans]
    if not rows:
        return "(none)"
    widths = {k: max(len(k), *(len(_cell(r[k])) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.rjust(w) for k, w in widths.items())]
    lines += ["  ".join(_cell(r[k]).rjust(w) for k, w in widths.items()) for r in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cmd_plan(args) -> int:
    cfg = load_config(args.config, args.overrides)
    hw = replace(HARDWARE[args.hardware], memory_bytes=args.gpu_memory)
    plans = enumerate_plans(cfg, args.gpus, hw)
    fitting = [p for p in plans if p.fits]
    if args.json:
        print(json.dumps({"config": args.config, "gpus": args.gpus, "hardware": asdict(hw),
                          "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
                          "fastest": fitting[0].to_dict() if fitting else None,
                          "plans": [p.to_dict() for p in plans]}, indent=1))
        return 0
    usable = hw.memory_bytes * (1 - hw.reserve) / GiB
    print(f"{args.config} on {args.gpus} x {hw.name} ({hw.memory_bytes / GiB:.0f} GiB, {usable:.1f} GiB usable), "
          f"{cfg.train.batch_size} rows x {cfg.data.seq_len} tokens per step, optimizer {cfg.optim.name}")
    print(f"{len(fitting)} of {len(plans)} candidate layouts fit; the {min(args.top, len(fitting))} fastest "
          "(memory per GPU in GiB, busiest rank):")
    print(format_table(fitting[: args.top]))
    if fitting:
        best = fitting[0]
        print(f"fastest: {best.layout.label()}, {best.layout.schedule}, {best.layout.microbatches} microbatches, "
              f"ZeRO-{best.layout.zero}, recomputation {best.layout.recompute}: "
              f"{best.step_s:.2f} s/step, MFU {best.mfu:.1%}, {best.total_bytes / GiB:.1f} GiB per GPU")
    else:
        least = min(plans, key=lambda p: p.total_bytes, default=None)
        hint = f"; the smallest needs {least.total_bytes / GiB:.1f} GiB per GPU" if least else ""
        print(f"no layout fits in {usable:.1f} GiB{hint}: use more GPUs or a smaller batch")
    return 0


def add_plan_commands(subparsers) -> None:
    """Register `flan plan` on the `flan` command line's subparsers."""
    p = subparsers.add_parser("plan", help="layouts, memory per GPU and step time on N GPUs (nothing allocated)")
    p.add_argument("config", help="TOML config, e.g. configs/flan-137b.toml")
    p.add_argument("--gpus", type=positive_int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=parse_bytes, default=80 * GiB, help="memory per GPU (default 80GiB)")
    p.add_argument("--hardware", choices=sorted(HARDWARE), default="h100",
                   help="peak FLOP/s and link bandwidths (engine/planner.py states them)")
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--json", action="store_true", help="every candidate as JSON")
    p.set_defaults(func=cmd_plan)
