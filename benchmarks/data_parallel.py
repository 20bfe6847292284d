"""Data parallelism per step and per rank: bytes sent against the ring all-reduce's 2(dp-1)/dp x gradient
bytes, optimizer-state memory with ZeRO-1 against plain data parallelism, and step time.

    python -m benchmarks.data_parallel                       # dp=2, the tiny preset's model (CPU, gloo)
    python -m benchmarks.data_parallel --dp 4 --bucket-mb 1,25

Each rank runs --steps training steps (forward, backward with the bucket all-reduces launched from the
gradient hooks, finish, clip, optimizer step: engine.train.train_step) on its slice of one global batch and
reports what engine/parallel/comm.py's tally counted: bytes it sent under the ring algorithm (an all-reduce
sends 2(dp-1)/dp of its buffer, a reduce-scatter and an all-gather (dp-1)/dp each, so ZeRO-1 moves the same
volume; the step's two scalar all-reduces, the target count and the loss, add 12 bytes) and the bytes of
AdamW state it holds. "wire" is what the process really wrote to its sockets during the step (Linux
/proc/self/io wchar): on gloo an all-reduce matches the ring figure, while gloo's reduce-scatter sends the
whole buffer, so ZeRO-1 over gloo moves 1.5x plain data parallelism's bytes at dp=2 (NCCL's ring reduce-scatter
does not). Writes runs/bench/data_parallel/.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.harness import environment, output_dir, print_table, run_ranks, write_json
from engine.batch import Batch
from engine.config import load_config, resolve_auto
from engine.data_source import rank_rows
from engine.model import build_model
from engine.parallel import comm, init_mesh, parallelize
from engine.parallel.zero import ZeroAdamW
from engine.train import train_step


def written_bytes() -> int:
    """Bytes this process has passed to write/send system calls so far (sockets included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def optimizer_state_bytes(optimizer) -> int:
    inner = optimizer.inner if isinstance(optimizer, ZeroAdamW) else optimizer  # a torch AdamW over its slices
    return sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values() if torch.is_tensor(t))


def measure_rank(rank: int, world: int, cases: list[dict], args) -> list[dict]:
    rows = []
    for case in cases:
        cfg = resolve_auto(load_config(args.config, [f"--parallel.zero={case['zero']}",
                                                      f"--parallel.bucket_mb={case['bucket_mb']}",
                                                      "--train.device=cpu", "--optim.warmup_steps=0"]))
        mesh = init_mesh(cfg)
        layout = parallelize(build_model(cfg.model, seed=0), cfg, mesh)
        optimizer = layout.build_optimizer()
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        mine = rank_rows(Batch(tokens, labels=tokens.roll(-1, dims=1)), mesh.dp_rank, mesh.dp)
        times, sent, wire = [], [], []
        for step in range(args.steps):
            written = written_bytes()
            start = time.perf_counter()
            with comm.count_bytes() as tally:
                train_step(layout, optimizer, mine, step)
            times.append(time.perf_counter() - start)
            sent.append(tally.total_sent())
            wire.append(written_bytes() - written)
        gradient_bytes = sum(p.numel() * p.element_size() for p in layout.parameters())
        rows.append(dict(case, rank=rank, dp=world, step_ms=1e3 * statistics.median(times[1:] or times),
                         sent_mib=sent[-1] / 2**20, wire_mib=wire[-1] / 2**20, gradient_mib=gradient_bytes / 2**20,
                         ring_formula_mib=2 * (world - 1) / world * gradient_bytes / 2**20,
                         optimizer_state_mib=optimizer_state_bytes(optimizer) / 2**20,
                         buckets=len(layout.sync.buckets)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--config", default="configs/tiny.toml", help="the model comes from this preset")
    parser.add_argument("--bucket-mb", default="1,25")
    parser.add_argument("--batch-size", type=int, default=4, help="global rows per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = [dict(zero=z, bucket_mb=float(b)) for b in args.bucket_mb.split(",") for z in (0, 1)]
    per_rank = [row for rows in run_ranks(measure_rank, args.dp, cases, args) for row in rows]
    columns = ["rank", "dp", "zero", "bucket_mb", "buckets", "gradient_mib", "sent_mib", "wire_mib", "ring_formula_mib",
               "optimizer_state_mib", "step_ms"]
    print_table(per_rank, columns, title="data parallelism per rank and step (CPU, gloo)")
    out = output_dir("data_parallel", args.out)
    write_json(out / "results.json", per_rank, meta=dict(environment(), **vars(args)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
