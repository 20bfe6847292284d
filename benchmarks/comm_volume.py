"""Bytes that tensor (and sequence) parallelism moves per transformer layer, measured against Megatron's formula.

    python -m benchmarks.comm_volume                    # tp 2 and 4, sp off and on, two widths (CPU, gloo)
    python -m benchmarks.comm_volume --tp 2,4,8 --d-model 256 --seq-len 128

Every collective of engine/parallel/comm.py is tallied (engine.parallel.comm.count_bytes) during one forward
and backward of the loss. The per-layer figure is the difference between a 2-layer and a 1-layer model, so
the embedding, the output head and the cross-entropy cancel out; the remainder is reported as "outside".

Megatron's count (Korthikanti et al. 2022, section 4.2.2): without sequence parallelism a layer does 4
all-reduces of the (B, S, d) activations per forward + backward (2 forward after the row-parallel linears,
2 backward at the column-parallel inputs); a ring all-reduce sends 2(t-1)/t of its payload from each rank.
With sequence parallelism each all-reduce becomes an all-gather plus a reduce-scatter, each sending (t-1)/t:
the same volume. "sent" below is per rank, under the ring algorithm. Writes runs/bench/comm_volume/.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import environment, output_dir, plot_lines, print_table, run_ranks, write_json
from engine.batch import Batch
from engine.config import Config, ModelConfig, ParallelConfig, resolve_auto
from engine.model import build_model
from engine.parallel import comm, init_mesh, parallelize

KINDS = {"all_reduce": "AR", "all_gather": "AG", "reduce_scatter": "RS"}  # kind -> short label


def layer_config(d_model: int, n_layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=d_model, n_layers=n_layers, n_heads=8, n_kv_heads=8,
                       head_dim=d_model // 8, d_ff=4 * d_model)


def tally_step(cfg: Config, mesh, batch: Batch) -> comm.CommTally:
    """The collectives of one forward + backward of the loss."""
    layout = parallelize(build_model(cfg.model, seed=0), cfg, mesh)
    with comm.count_bytes() as tally:
        layout.model(batch).backward()
    return tally


def measure_rank(rank: int, world: int, cases: list[dict]) -> list[dict]:
    mesh = None
    rows = []
    for case in cases:
        tallies = {}
        for n_layers in (1, 2):
            cfg = Config(model=layer_config(case["d_model"], n_layers),
                         parallel=ParallelConfig(tp=world, sp=case["sp"]))
            cfg.train.device = "cpu"  # gloo: the byte count does not depend on the device
            cfg = resolve_auto(cfg)
            mesh = mesh or init_mesh(cfg)
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, cfg.model.vocab_size, (case["batch"], case["seq_len"]), generator=gen)
            tallies[n_layers] = tally_step(cfg, mesh, Batch(tokens, labels=tokens))
        rows.append(summarise(case, world, tallies[1], tallies[2]))
    torch.distributed.destroy_process_group()
    return rows


def summarise(case: dict, tp: int, one: comm.CommTally, two: comm.CommTally) -> dict:
    activation_bytes = case["batch"] * case["seq_len"] * case["d_model"] * 4  # fp32
    per_layer = {k: two.sent_bytes[k] - one.sent_bytes[k] for k in KINDS}
    calls = {k: two.calls[k] - one.calls[k] for k in KINDS}
    measured = sum(per_layer.values())
    formula = 4 * 2 * (tp - 1) / tp * activation_bytes
    return {"tp": tp, "sp": case["sp"], "B": case["batch"], "S": case["seq_len"], "d": case["d_model"],
            "calls_per_layer": " ".join(f"{label} x{calls[k]}" for k, label in KINDS.items() if calls[k]),
            "sent_KiB_per_layer": measured / 1024, "megatron_KiB": formula / 1024, "ratio": measured / formula,
            "outside_KiB": (sum(one.sent_bytes.values()) - measured) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="2,4", help="comma list of tensor-parallel degrees (one process each)")
    parser.add_argument("--d-model", default="64,128", help="comma list of widths")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default runs/bench/comm_volume)")
    args = parser.parse_args()
    cases = [{"d_model": int(d), "sp": sp, "seq_len": args.seq_len, "batch": args.batch}
             for d in args.d_model.split(",") for sp in (False, True)]
    rows = []
    for tp in map(int, args.tp.split(",")):
        rows.extend(run_ranks(measure_rank, tp, cases)[0])  # every rank counts the same bytes: rank 0's rows
    columns = ["tp", "sp", "B", "S", "d", "calls_per_layer", "sent_KiB_per_layer", "megatron_KiB", "ratio",
               "outside_KiB"]
    print_table(rows, columns, title="per-rank bytes sent per layer, forward + backward (fp32, ring algorithm)")
    out = output_dir("comm_volume", args.out)
    write_json(out / "results.json", rows, meta=environment())
    plot_lines([dict(r, series=f"d={r['d']} sp={r['sp']}") for r in rows], x="tp", y="sent_KiB_per_layer",
               series="series", path=out / "sent_per_layer.png", title="bytes sent per rank per layer")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
