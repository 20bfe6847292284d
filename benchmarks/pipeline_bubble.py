"""The pipeline bubble measured on real processes against the formula, for every schedule.

    python -m benchmarks.pipeline_bubble                         # pp=2, microbatches 2, 4, 8 (CPU, gloo)
    python -m benchmarks.pipeline_bubble --pp 4 --microbatches 4,8 --d-model 128

Each rank times its forward and backward actions (busy time); the measured bubble of a rank is
1 - busy / wall over one optimizer step's schedule (median of --reps steps after one warm-up), averaged over
ranks. The formula is (p-1)/(m+p-1) for gpipe and 1f1b and (p-1)/(v m+p-1) interleaved, which assumes equal
stages, backward = 2 x forward and free communication; the simulator's figure for the measured
backward/forward ratio is shown too. On a CPU the ranks share cores, so read the numbers as a sanity check
of the schedules' shape, not as a GPU prediction. Writes runs/bench/pipeline_bubble/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.harness import environment, output_dir, plot_lines, print_table, run_ranks, write_json
from engine.batch import Batch
from engine.config import Config, ModelConfig, ParallelConfig, resolve_auto
from engine.model import build_model
from engine.parallel import init_mesh, parallelize
from engine.parallel.pipeline import run_schedule, split_microbatches
from engine.parallel.schedules import bubble_formula, schedule_actions, simulate


def model_config(d_model: int, n_layers: int) -> ModelConfig:
    # A small vocabulary keeps the head's cost (and so the stage imbalance) negligible.
    return ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                       head_dim=d_model // 4, d_ff=4 * d_model)


def measure_rank(rank: int, world: int, cases: list[dict], args) -> list[dict]:
    if hasattr(os, "sched_setaffinity") and world <= os.cpu_count():
        os.sched_setaffinity(0, {rank})  # one core per stage, as one device per stage
    rows = []
    for case in cases:
        cfg = Config(model=model_config(args.d_model, args.layers_per_stage * world * case["virtual"]),
                     parallel=ParallelConfig(pp=world, schedule=case["schedule"], microbatches=case["microbatches"],
                                             virtual_stages=case["virtual"]))
        cfg.train.device = "cpu"
        cfg = resolve_auto(cfg)
        mesh = init_mesh(cfg)
        layout = parallelize(build_model(cfg.model, seed=0), cfg, mesh)
        gen = torch.Generator().manual_seed(0)
        rows_per_step = args.rows * case["microbatches"]
        tokens = torch.randint(0, cfg.model.vocab_size, (rows_per_step, args.seq_len), generator=gen)
        batch = Batch(tokens, labels=tokens.roll(-1, dims=1))
        microbatches = split_microbatches(batch, case["microbatches"])
        fractions = []
        for rep in range(args.reps + 1):
            layout.pipeline.busy_s = 0.0
            torch.distributed.barrier(group=mesh.pp_group)
            start = time.perf_counter()
            run_schedule(layout.pipeline, microbatches, loss_scale=1.0 / batch.num_target_tokens())
            wall = time.perf_counter() - start
            layout.model.zero_grad(set_to_none=True)
            if rep:  # the first step warms up allocators and gloo's connections
                fractions.append(1 - layout.pipeline.busy_s / wall)
        rows.append(dict(case, rank=rank, bubble=statistics.median(fractions)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", default="2,4,8")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers-per-stage", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=2, help="rows per microbatch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = [dict(schedule=s, microbatches=m, virtual=v)
             for m in map(int, args.microbatches.split(","))
             for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)) if s != "interleaved" or m % args.pp == 0]
    per_rank = [row for rows in run_ranks(measure_rank, args.pp, cases, args) for row in rows]
    table = []
    for case in cases:
        mine = [r["bubble"] for r in per_rank if all(r[k] == case[k] for k in case)]
        formula = bubble_formula(case["schedule"], args.pp, case["microbatches"], case["virtual"])
        simulated = simulate(schedule_actions(case["schedule"], args.pp, case["microbatches"], case["virtual"]),
                             args.pp, case["virtual"]).bubble_fraction
        table.append(dict(case, pp=args.pp, measured=sum(mine) / len(mine), per_rank=[round(b, 3) for b in mine],
                          formula=formula, simulated=simulated))
    print_table(table, ["schedule", "pp", "microbatches", "virtual", "measured", "formula", "simulated", "per_rank"],
                title="pipeline bubble: idle fraction of each rank's step (CPU, gloo)")
    out = output_dir("pipeline_bubble", args.out)
    write_json(out / "results.json", table, meta=dict(environment(), **vars(args)))
    plot_lines([dict(r, series=f"{r['schedule']} {k}", value=r[k]) for r in table for k in ("measured", "formula")],
               x="microbatches", y="value", series="series", path=out / "bubble.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
