"""Mixer throughput and packing efficiency: render + tokenize + pack on one core.

    python -m benchmarks.mixer                       # tiny rows (192 + 64) and FLAN rows (1024 + 256)
    python -m benchmarks.mixer --examples 20000 --pools 16,64
    python -m benchmarks.mixer --scale flan          # FLAN's full row counts, generated in a temp folder

--scale flan (benchmarks/mixer_flan.py) writes a mixture with FLAN's train row counts (about 85M rows, several
GB, in a temporary folder that is removed afterwards), streams it through the same TuningStream with the 30k
cap and FLAN's budgets, and reports examples/s per core and the peak resident memory of the process.

For each row budget and packer pool size it streams packed batches from the training mixture of
configs/tiny.toml (NLI held out) with the cached tokenizer, and reports examples per second (wall
clock and CPU time of this process, which is what "one core" means on a shared machine), and packing
efficiency (non-padding share of row positions). A second table splits one example's cost into
render, tokenize and pack. Writes runs/bench/mixer/results.json and a plot of both figures against
the pool size.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.harness import environment, output_dir, plot_lines, print_table, write_json
from engine.config import load_config
from engine.tokenizer import load_tokenizer
from flan.mixture import ExampleStream, Mixture, TuningStream
from flan.packing import choose_segments, encode_pairs

BUDGETS = {"tiny": (192, 64), "flan": (1024, 256)}


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def stream_case(cfg_path: str, budget: str, pool: int, examples: int, tokenizer) -> dict:
    input_len, target_len = BUDGETS[budget]
    cfg = load_config(cfg_path, [f"--data.input_len={input_len}", f"--data.target_len={target_len}"])
    stream = TuningStream(cfg, tokenizer, mixture=Mixture.from_config(cfg), pool=pool)
    stream.next_batch()  # warm-up: first refill of the pool

    def consumed():
        s = stream.state_dict()
        return s["epoch"] * stream.mixture.epoch_len + s["index"] - len(s["pool"])

    start = consumed()

    def run():
        while consumed() - start < examples:
            stream.next_batch()

    _, wall, cpu = _timed(run)
    n = consumed() - start
    return {"budget": budget, "row_len": stream.row_len, "pool": pool, "examples": n,
            "ex_per_s_wall": round(n / wall), "ex_per_s_cpu": round(n / cpu),
            "efficiency": round(stream.efficiency, 4)}


def stage_case(cfg_path: str, examples: int, tokenizer) -> list[dict]:
    input_len, target_len = BUDGETS["tiny"]
    cfg = load_config(cfg_path, [f"--data.input_len={input_len}", f"--data.target_len={target_len}"])
    mixture = Mixture.from_config(cfg)
    keys = ExampleStream(mixture).take(examples)
    rendered, _, render_cpu = _timed(lambda: [mixture.render(k) for k in keys])
    segments, _, tok_cpu = _timed(lambda: encode_pairs(tokenizer, [r.prompt for r in rendered],
                                                       [r.target for r in rendered],
                                                       input_len=input_len, target_len=target_len))
    lengths = [s.length for s in segments]

    def pack():
        for i in range(0, len(lengths) - 64, 4):
            choose_segments(lengths[i:i + 64], input_len + target_len)

    _, _, pack_cpu = _timed(pack)
    pack_cpu *= 4 / 3  # ~3 examples per tiny row: scale the per-row choice to per-example cost
    return [{"stage": name, "us_per_example_cpu": round(1e6 * t / len(keys), 2)}
            for name, t in (("render", render_cpu), ("tokenize", tok_cpu), ("pack (choose)", pack_cpu))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.toml")
    ap.add_argument("--examples", type=int, default=20000, help="examples streamed per case")
    ap.add_argument("--pools", default="8,16,32,64,128", help="comma list of packer pool sizes")
    ap.add_argument("--out", default=None, help="output folder (default runs/bench/mixer)")
    ap.add_argument("--scale", choices=("samples", "flan"), default="samples",
                    help="samples: the shared data; flan: a generated mixture with FLAN's row counts")
    ap.add_argument("--cap", type=int, default=30000, help="--scale flan: the mixing cap (FLAN's mixture: 30k)")
    ap.add_argument("--tokenizer", default="", help="a SentencePiece .model (default: the config's)")
    args = ap.parse_args(argv)
    if args.scale == "flan":
        from benchmarks.mixer_flan import run_flan_scale
        return run_flan_scale(args)
    tokenizer = load_tokenizer(load_config(args.config, [f"--data.tokenizer={args.tokenizer}"] if args.tokenizer else []))
    rows = [stream_case(args.config, budget, int(p), args.examples, tokenizer)
            for budget in BUDGETS for p in args.pools.split(",")]
    print_table(rows, ["budget", "row_len", "pool", "examples", "ex_per_s_wall", "ex_per_s_cpu", "efficiency"],
                title="Mixer: render + tokenize + pack, one process")
    stages = stage_case(args.config, min(args.examples, 10000), tokenizer)
    print_table(stages, ["stage", "us_per_example_cpu"], title="Cost per example by stage (CPU time)")
    out = output_dir("mixer", args.out)
    write_json(out / "results.json", rows + stages, meta=environment())
    plot_lines(rows, x="pool", y="efficiency", series="budget", path=out / "efficiency.png",
               title="Packing efficiency")
    plot_lines(rows, x="pool", y="ex_per_s_cpu", series="budget", path=out / "throughput.png",
               title="Examples per CPU second")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
