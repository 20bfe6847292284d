"""Memory per rank: the dry run of flan-137b at its preset layout and at the planner's best layouts, a real
build of one flan-137b shard, and a real tp=4 CPU run's peak RSS.

    python -m benchmarks.memory                        # every pipeline stage of the preset and 64/256/1024-GPU layouts
    python -m benchmarks.memory --stages ends          # first, middle and last stage only
    python -m benchmarks.memory --skip-dry --skip-build   # only the CPU measurement

Dry run (engine/memory.py, the code of `flan memory`): configs/flan-137b.toml as written, then for each GPU count
the fastest fitting layout of `flan plan` applied to it; one training step of tp rank 0 of each chosen stage runs
on fake tensors, and its peak and categories stand beside the planner's figure for that stage.
Shard build: rank 0 of the preset's world built for real on the CPU (a fake process group stands in for the
other ranks): the seconds to materialise and initialise its shards and the process's peak RSS beside them.
CPU measurement: one training step (Adafactor, one row of 64 tokens, so the weights dominate) of a ~0.5B-
parameter model, in one process and as tp=4 on real gloo processes; the peak resident memory (VmHWM) of each
process, and of a process that only imports torch and the engine (the fixed cost every rank pays).
Results: a table, benchmarks/results/memory/results.json and table.txt.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import environment, format_table, write_json  # noqa: E402
from tests.engine.parallel.launch import launch  # noqa: E402

GiB = 1024 ** 3
HALF_B = ["--model.vocab_size=32000", "--model.d_model=1536", "--model.n_layers=16", "--model.n_heads=12",
          "--model.n_kv_heads=12", "--model.head_dim=128", "--model.d_ff=4096", "--optim.name=adafactor",
          "--data.seq_len=64", "--train.batch_size=1"]


# ---- dry runs -----------------------------------------------------------------------------------------------
def layout_config(cfg, layout):
    """The config with the planner layout's parallel section."""
    parallel = dataclasses.replace(cfg.parallel, dp=layout.dp, pp=layout.pp, tp=layout.tp, sp=layout.sp,
                                   microbatches=layout.microbatches, zero=layout.zero, recompute=layout.recompute,
                                   schedule=layout.schedule if layout.pp > 1 else cfg.parallel.schedule,
                                   virtual_stages=layout.virtual_stages)
    return dataclasses.replace(cfg, parallel=parallel).validate("benchmarks/memory.py")


def dry_rows(gpu_counts: list[int], stages: str) -> list[dict]:
    from engine.config import load_config
    from engine.memory import dry_run, world_size
    from engine.memory_cli import report_dict
    from engine.planner import enumerate_plans

    base = load_config("configs/flan-137b.toml")
    p = base.parallel
    layouts = [("preset", world_size(base), base,
                f"preset dp{max(p.dp, 1)} pp{p.pp} tp{p.tp} {p.schedule}x{p.virtual_stages} m{p.microbatches} {p.recompute}")]
    for gpus in gpu_counts:
        best = next(p for p in enumerate_plans(base, gpus) if p.fits).layout
        layouts.append((str(gpus), gpus, layout_config(base, best), f"{best.label()} {best.schedule}x"
                        f"{best.virtual_stages} m{best.microbatches} {best.recompute}"))
    rows = []
    for name, gpus, cfg, label in layouts:
        pp, tp = cfg.parallel.pp, cfg.parallel.tp
        chosen = range(pp) if stages == "all" else sorted({0, pp // 2, pp - 1})
        for stage in chosen:
            d = report_dict(cfg, dry_run(cfg, stage * tp))
            rows.append({"gpus": gpus, "layout": label, "pp_rank": stage,
                         "peak_gib": d["peak_bytes"] / GiB, "planned_gib": d["planned_bytes"] / GiB,
                         "plan/peak": d["planned_bytes"] / d["peak_bytes"], "build_s": d["seconds"]["build"],
                         "step_s": d["seconds"]["step"],
                         **{f"{k}_gib": v / GiB for k, v in d["categories"].items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- one real flan-137b shard -------------------------------------------------------------------------------
def shard_build(rank: int) -> dict:
    """Rank `rank` of flan-137b's preset world built for real on the CPU (fp32 shards, seeded init)."""
    from engine.build import build_layout
    from engine.config import load_config
    from engine.memory import fake_world, gpu_config, world_size
    from engine.parallel import init_mesh

    cfg = gpu_config(load_config("configs/flan-137b.toml"))
    with fake_world(rank, world_size(cfg)):
        mesh = init_mesh(cfg)
        started = time.perf_counter()
        layout = build_layout(cfg, mesh)
        build_s = time.perf_counter() - started
        numel = sum(p.numel() for p in layout.parameters())
    return {"run": f"flan-137b rank {rank} shard build", "build_s": build_s, "params": numel,
            "shard_gib": numel * 4 / GiB, "peak_gib": high_water_mark() / GiB}


def build_rows(rank: int) -> list[dict]:
    return [in_subprocess(f"import json; from benchmarks.memory import shard_build; "
                          f"print(json.dumps(shard_build({rank})))")]


# ---- the CPU measurement ------------------------------------------------------------------------------------
def high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def cpu_step(flags: list[str]) -> dict:
    """One real training step of this rank (gloo when launched); this process's peak RSS and build time."""
    from engine.config import load_config, resolve_auto
    from engine.memory import step_rows
    from engine.build import build_layout
    from engine.parallel import init_mesh
    from engine.train import train_step

    cfg = resolve_auto(load_config("configs/tiny.toml", HALF_B + flags), cuda_available=False)
    mesh = init_mesh(cfg)
    started = time.perf_counter()
    layout = build_layout(cfg, mesh)
    build_s = time.perf_counter() - started
    optimizer = layout.build_optimizer()
    train_step(layout, optimizer, step_rows(cfg, mesh.dp), 0)
    return {"rank": mesh.rank, "peak_gib": high_water_mark() / GiB, "build_s": build_s,
            "params": sum(p.numel() for p in layout.parameters())}


def in_subprocess(code: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_rows() -> list[dict]:
    imports = in_subprocess("import json, torch, engine.train, engine.build; from benchmarks.memory import "
                            "high_water_mark as h; print(json.dumps({'peak_gib': h() / 2**30}))")
    one = in_subprocess("import json; from benchmarks.memory import cpu_step; print(json.dumps(cpu_step([])))")
    tp4 = launch(cpu_step, 4, ["--parallel.tp=4"], timeout=900)
    largest = max(r["peak_gib"] for r in tp4)
    rows = [{"run": "import torch + engine", "peak_gib": imports["peak_gib"]},
            {"run": "one process", "peak_gib": one["peak_gib"], "params": one["params"], "build_s": one["build_s"]}]
    rows += [{"run": f"tp=4 rank {r['rank']}", "peak_gib": r["peak_gib"], "params": r["params"],
              "build_s": r["build_s"]} for r in tp4]
    goal = one["peak_gib"] / 3 + imports["peak_gib"]
    rows.append({"run": "goal: one / 3 + import", "peak_gib": goal, "met": largest <= goal,
                 "ratio": largest / one["peak_gib"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--stages", choices=["all", "ends"], default="all")
    parser.add_argument("--skip-dry", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, tables = [], []
    if not args.skip_cpu:
        cpu = cpu_rows()
        rows += [{"part": "cpu", **r} for r in cpu]
        tables.append(format_table(cpu, columns=["run", "peak_gib", "params", "build_s", "met", "ratio"]))
    if not args.skip_build:
        build = build_rows(0)
        rows += [{"part": "shard_build", **r} for r in build]
        tables.append(format_table(build, columns=["run", "params", "shard_gib", "peak_gib", "build_s"]))
    if not args.skip_dry:
        dry = dry_rows(args.gpus, args.stages)
        rows += [{"part": "dry_run", **r} for r in dry]
        tables.append(format_table(dry, columns=[
            "gpus", "layout", "pp_rank", "peak_gib", "planned_gib", "plan/peak", "weights_gib", "gradients_gib",
            "optimizer_state_gib", "activations_gib", "comm_buffers_gib", "temporaries_gib", "build_s", "step_s"]))
    load = os.getloadavg()  # the machine is shared: the timings depend on it
    write_json(out / "results.json", rows, meta={**environment(), "stages": args.stages, "load_average": load})
    text = "\n\n".join(tables) + f"\n\nload average at the end: {load}\n"
    (out / "table.txt").write_text(text)
    print(text)

if __name__ == "__main__":
    main()
