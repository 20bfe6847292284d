"""Rank-classification throughput of our scorer against lm-evaluation-harness, same model, same examples, and
of our scorer on dp=1 against dp=N processes.

    python -m benchmarks.scorer                                 # tiny shape, rte/copa/hellaswag, 48 examples
    python -m benchmarks.scorer --checkpoint runs/tiny-flan --examples 96 --batch-sizes 4,16,32 --threads 1
    python -m benchmarks.scorer --dp 2 --threads 1 --datasets rte,copa   # + requests/s of 2 processes vs 1

The model (random weights in the `configs/tiny.toml` shape, or a checkpoint) is exported with engine/hf.py
and loaded by lm-eval's HFLM (fp32, CPU). Both score every option of the same rendered requests (template 0
of each dataset's validation rows): ours with flan.scorer.rank_classify (each prompt once, its KV cache
shared by the options), lm-eval through its loglikelihood path (one (context, " " + option) request per
option). Reported: examples per second by wall clock and by this process's CPU time (the fair figure on a
shared machine, where other work steals the cores), each the best of the timed repetitions after a warm-up;
the largest per-option log-likelihood difference; whether the accuracies are equal. Writes
runs/bench/scorer/results.json and examples_per_s.png (per CPU second).

With --dp N the same requests (all datasets together) are also scored through flan eval's path,
flan.layout_scorer.score_with_layout on a Layout loaded from the checkpoint, once by one process and once by N
gloo processes with parallel.dp=N (each `--threads` threads): requests per second by wall clock, each rep
timed from a barrier to the slowest rank's end, every rep kept so the spread shows (a shared machine's other
jobs steal cores). The scores of the N-process run are checked equal to the one-process run's.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import environment, output_dir, plot_lines, print_table, write_json
from engine.checkpoint import save_weights
from engine.config import Config, load_config
from engine.hf import export_hf
from engine.model import build_model
from engine.paths import shared_data_dir
from engine.tokenizer import load_tokenizer
from flan.evaluate import build_requests
from flan.loaders import load_split
from flan.peer import hflm, lm_eval_loglikelihoods
from flan.registry import load_registry
from flan.scorer import rank_classify


def model_and_export(args, work: Path):
    """Our model and its exported HF folder: a checkpoint's, or random weights in the config's shape."""
    from flan.eval_cli import load_layout, resolve_checkpoint

    if args.checkpoint:
        step = resolve_checkpoint(args.checkpoint, "--checkpoint")
        cfg = Config()
        cfg.train.device = "cpu"
        layout, tokenizer, _, _ = load_layout(step, cfg)
        model = layout.model
    else:
        cfg: Config = load_config(args.config)
        tokenizer = load_tokenizer(cfg)
        cfg.data.tokenizer = str(tokenizer.path)
        model = build_model(cfg.model, seed=0).eval()
        step = save_weights(work / "run", 0, model.state_dict(), {"config": cfg.to_dict()}, keep=1)
    return model, tokenizer, export_hf(step, work / "hf"), step


def _dp_worker(rank: int, world: int, port: int, step: str, requests, bs: int, reps: int, threads: int, results):
    """One rank of the dp timing: every rep's wall seconds (the slowest rank's) and the log-likelihoods."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from flan.eval_cli import load_layout
    from flan.layout_scorer import score_with_layout

    cfg = Config()
    cfg.parallel.dp, cfg.train.device = world, "cpu"
    layout, tokenizer, step_cfg, mesh = load_layout(Path(step), cfg)

    def once():
        return score_with_layout(layout, tokenizer, requests, batch_size=bs, input_len=2048, max_new_tokens=1)

    out = once()  # warm-up
    walls = []
    for _ in range(reps):
        if world > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        once()
        wall = torch.tensor(time.perf_counter() - start)
        if world > 1:
            torch.distributed.all_reduce(wall, op=torch.distributed.ReduceOp.MAX)
        walls.append(float(wall))
    if world > 1:
        torch.distributed.destroy_process_group()
    results.put((rank, walls, [list(r.logprobs) for r in out]))


def dp_timings(step: Path, requests, world: int, bs: int, reps: int, threads: int) -> tuple[list[float], list]:
    """(wall seconds per rep, rank 0's log-likelihoods) of scoring `requests` on `world` dp processes."""
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_dp_worker, args=(r, world, port, str(step), requests, bs, reps, threads, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict((rank, (walls, lls)) for rank, walls, lls in (results.get(timeout=900) for _ in procs))
    for p in procs:
        p.join()
    return got[0]


def dp_rows(step: Path, requests, args) -> list[dict]:
    """requests/s of one process and of args.dp processes on the same requests (every rep)."""
    bs = int(args.batch_sizes.split(",")[-1])
    one, one_lls = dp_timings(step, requests, 1, bs, args.reps, args.threads or 1)
    many, many_lls = dp_timings(step, requests, args.dp, bs, args.reps, args.threads or 1)
    diff = max(abs(a - b) for x, y in zip(one_lls, many_lls) for a, b in zip(x, y))
    rows = []
    for dp, walls in ((1, one), (args.dp, many)):
        rates = sorted(len(requests) / w for w in walls)
        rows.append({"dp": dp, "batch_size": bs, "requests": len(requests), "threads_per_rank": args.threads or 1,
                     "requests_per_s_best": rates[-1], "requests_per_s_worst": rates[0],
                     "requests_per_s_all": rates, "max_ll_diff_vs_dp1": diff})
    rows[1]["speedup_best"] = rows[1]["requests_per_s_best"] / rows[0]["requests_per_s_best"]
    rows[1]["speedup_range"] = [rows[1]["requests_per_s_worst"] / rows[0]["requests_per_s_best"],
                                rows[1]["requests_per_s_best"] / rows[0]["requests_per_s_worst"]]
    return rows


def best_times(fn, reps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `reps` calls after one untimed warm-up call."""
    fn()
    runs = []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(w for w, _ in runs), min(c for _, c in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.toml", help="model shape when no checkpoint is given")
    parser.add_argument("--checkpoint", help="run or step folder to score with instead of random weights")
    parser.add_argument("--datasets", default="rte,copa,hellaswag")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-sizes", default="4,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both scorers (0: torch's default); 1 steadies a shared machine")
    parser.add_argument("--dp", type=int, default=0, help="also time N data-parallel processes against one")
    parser.add_argument("--skip-lm-eval", action="store_true", help="only the dp timing")
    parser.add_argument("--out", help="output folder (default runs/bench/scorer)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    model, tokenizer, hf_dir, step = model_and_export(args, work)
    registry, data_dir = load_registry(), shared_data_dir()
    rows, every = [], []
    for name in args.datasets.split(","):
        spec = registry.get(name)
        val = load_split(spec, "validation", data_dir=data_dir).rows
        requests = build_requests(spec, val, list(range(min(args.examples, len(val)))), 0)
        every += requests
        if args.skip_lm_eval:
            continue
        golds = [r.gold for r in requests]
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            lm = hflm(hf_dir, bs)
            ours = rank_classify(model, tokenizer, requests, batch_size=bs, input_len=2048)
            theirs = lm_eval_loglikelihoods(lm, requests)
            diff = max(abs(a - b) for r, t in zip(ours, theirs) for a, b in zip(r.logprobs, t))
            acc_ours = sum(r.prediction == g for r, g in zip(ours, golds)) / len(golds)
            acc_theirs = sum(max(range(len(t)), key=t.__getitem__) == g for t, g in zip(theirs, golds)) / len(golds)
            timings = {
                "ours": best_times(lambda: rank_classify(model, tokenizer, requests, batch_size=bs, input_len=2048),
                                   args.reps),
                "lm-eval": best_times(lambda: lm_eval_loglikelihoods(lm, requests), args.reps),
            }
            for provider, (wall, cpu) in timings.items():
                rows.append({"dataset": name, "provider": provider, "batch_size": bs, "examples": len(requests),
                             "options": sum(len(r.options) for r in requests), "wall_s": wall, "cpu_s": cpu,
                             "examples_per_s": len(requests) / wall, "examples_per_cpu_s": len(requests) / cpu,
                             "max_ll_diff": diff,
                             "acc": acc_ours if provider == "ours" else acc_theirs,
                             "acc_equal": acc_ours == acc_theirs})
            del lm
    for r in rows:
        ref = next(x for x in rows if x["dataset"] == r["dataset"] and x["batch_size"] == r["batch_size"]
                   and x["provider"] == "lm-eval")
        r["speedup_wall"] = r["examples_per_s"] / ref["examples_per_s"]
        r["speedup_cpu"] = r["examples_per_cpu_s"] / ref["examples_per_cpu_s"]
    columns = ["dataset", "provider", "batch_size", "examples", "options", "examples_per_s", "examples_per_cpu_s",
               "speedup_wall", "speedup_cpu", "acc", "acc_equal", "max_ll_diff"]
    out = output_dir("scorer", args.out)
    if rows:
        print_table(rows, columns, title=f"rank classification on CPU ({torch.get_num_threads()} threads)")
        plot_lines(rows, x="batch_size", y="examples_per_cpu_s", series=("provider", "dataset"),
                   path=out / "examples_per_s.png", title="rank classification, examples per CPU second")
    dp = dp_rows(step, every, args) if args.dp > 1 else []
    if dp:
        print_table(dp, ["dp", "batch_size", "requests", "threads_per_rank", "requests_per_s_best",
                         "requests_per_s_worst", "speedup_best", "max_ll_diff_vs_dp1"],
                    title="flan eval scoring path, data-parallel processes on CPU")
    write_json(out / "results.json", rows + dp, meta=dict(environment(), threads=torch.get_num_threads(),
                                                          checkpoint=args.checkpoint or f"random {args.config}"))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
