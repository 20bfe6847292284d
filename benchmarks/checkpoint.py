"""Sharded checkpoint cost on CPU: save and load time and bytes written per rank, by model and layout.

    python benchmarks/checkpoint.py                      # tiny and gpu-125m, 1 rank and tp=2, sync and async
    python benchmarks/checkpoint.py --configs configs/tiny.toml --layouts 1 tp=2 pp=2,dp=2

Each layout runs on real gloo processes (tests/engine/parallel/launch.py starts them as torchrun would). A model with
one AdamW step's state is saved synchronously, then twice with async_save (the time until `save` returns, and
until the write is done; the first async save allocates the CPU staging buffers, later ones reuse them), loaded
back under the same layout, and loaded on one device by rank 0.
Results: a table, runs/bench/checkpoint/results.json and a bar plot of the times.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import environment, output_dir, print_table, write_json  # noqa: E402
from tests.engine.parallel.launch import launch  # noqa: E402


def layout_flags(text: str) -> list[str]:
    """'1' -> one rank; 'tp=2' / 'pp=2,dp=2' -> --parallel.* flags."""
    if text == "1":
        return []
    return [f"--parallel.{part.split('=')[0]}={part.split('=')[1]}" for part in text.split(",")]


def world_size(text: str) -> int:
    size = 1
    for part in text.split(",") if text != "1" else []:
        size *= int(part.split("=")[1])
    return size


def _measure(config: str, flags: list[str], folder: str) -> dict:
    import torch

    from engine import checkpoint as ckpt
    from engine.config import load_config, resolve_auto
    from engine.model import build_model
    from engine.parallel import Mesh, init_mesh, parallelize

    cfg = resolve_auto(load_config(config, flags + ["--parallel.zero=0"]))
    mesh = init_mesh(cfg)
    layout = parallelize(build_model(cfg.model, 0), cfg, mesh)
    optimizer = layout.build_optimizer()
    for p in layout.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    meta = {"config": cfg.to_dict()}
    row = {}

    t0 = time.perf_counter()
    path = ckpt.Checkpointer(f"{folder}/sync", mesh, keep=1).save(1, layout, optimizer, meta)
    row["save_s"] = time.perf_counter() - t0
    row["bytes_written"] = sum(f.stat().st_size for f in path.iterdir() if f"r{mesh.rank:05d}" in f.name)

    saver = ckpt.Checkpointer(f"{folder}/async", mesh, keep=1, async_save=True)
    for step in (1, 2):  # the first save allocates the CPU staging buffers, the second reuses them
        t0 = time.perf_counter()
        saver.save(step, layout, optimizer, meta)
        row[f"async{step}_blocking_s"] = time.perf_counter() - t0
        saver.wait()
        row[f"async{step}_total_s"] = time.perf_counter() - t0

    fresh = parallelize(build_model(cfg.model, 1), cfg, mesh)
    fresh_opt = fresh.build_optimizer()
    t0 = time.perf_counter()
    ckpt.load_checkpoint(path, fresh, fresh_opt)
    row["load_s"] = time.perf_counter() - t0
    if mesh.world_size > 1:
        torch.distributed.barrier()
    if mesh.rank == 0:
        single = parallelize(build_model(cfg.model, 1), cfg, Mesh())
        single_opt = single.build_optimizer()
        t0 = time.perf_counter()
        ckpt.load_checkpoint(path, single, single_opt)
        row["load_one_device_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/tiny.toml", "configs/gpu-125m.toml"])
    parser.add_argument("--layouts", nargs="+", default=["1", "tp=2"],
                        help="1 (one rank) or comma lists such as tp=2 or pp=2,dp=2")
    parser.add_argument("--out", default=None, help="output folder (default runs/bench/checkpoint)")
    args = parser.parse_args(argv)
    rows = []
    for config in args.configs:
        for layout in args.layouts:
            folder = tempfile.mkdtemp(prefix="ckpt-bench-", dir=output_dir("checkpoint", args.out))
            try:
                results = launch(_measure, world_size(layout), config, layout_flags(layout), folder, timeout=1200)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            for rank, r in enumerate(results):
                rows.append({"config": Path(config).stem, "layout": layout, "rank": rank,
                             "MiB_written": r["bytes_written"] / 2**20, "save_s": r["save_s"],
                             **{k: r[k] for k in r if k.startswith("async")},
                             "load_s": r["load_s"], "load_one_device_s": r.get("load_one_device_s")})
    columns = ["config", "layout", "rank", "MiB_written", "save_s", "async1_blocking_s", "async2_blocking_s",
               "async2_total_s", "load_s", "load_one_device_s"]
    print_table(rows, columns, title="sharded checkpoints on CPU (weights + AdamW state, fp32)")
    out = output_dir("checkpoint", args.out)
    write_json(out / "results.json", rows, meta=environment())
    _plot(rows, out / "times.png")
    print(f"wrote {out / 'results.json'} and {out / 'times.png'}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['config']}\n{r['layout']} r{r['rank']}" for r in rows]
    keys = ["save_s", "async2_blocking_s", "load_s"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width, label=key)
    ax.set_xticks([x + width for x in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
