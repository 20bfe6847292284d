"""Training throughput and MFU of a preset with each kernel choice, on one device.

    python -m benchmarks.sm90_train configs/gpu-125m.toml --out OUT        # GPU: every kernel choice
    python -m benchmarks.sm90_train configs/tiny.toml --smoke --out OUT    # CPU interpreter, one tiny step

For each kernel choice ATTENTION/LOSS it builds the preset's model through the engine's own path
(resolve_auto, init_mesh, build_layout, the Layout's optimizer) and times `train_step`, the function the
training loop runs, on synthetic rows of the preset's length: unpacked (one document per row) and packed
(documents of 1/8 to 1/2 of the row laid end to end). Tokens/s counts every token of the step; model
TFLOP/s uses engine.info.training_flops_per_token (the loop's own figure) and MFU divides by
--peak-tflops (989 for H100/H200 SXM dense bf16). Timed steps follow warm-up steps, which absorb
autotuning and compilation; each row reports the median step time and its min..max.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from benchmarks.harness import environment, output_dir, print_table, write_json
from engine.batch import Batch
from engine.config import load_config, resolve_auto
from engine.info import training_flops_per_token
from engine.parallel import init_mesh
from engine.train import build_layout, train_step

# ATTENTION/LOSS; "+tma" and "+fused-bwd" after triton set model.attention_tiles=tma and
# model.attention_backward=fused.
CHOICES = ["torch/torch", "triton/torch", "triton/triton", "triton/fused", "triton+tma/fused", "triton+fused-bwd/fused"]
MODIFIERS = {"tma": "--model.attention_tiles=tma", "fused-bwd": "--model.attention_backward=fused"}
H100_BF16_TFLOPS = 989.0
SMOKE_OVERRIDES = ["--train.device=cpu", "--train.batch_size=2", "--data.seq_len=32", "--model.n_layers=1",
                   "--model.d_model=64", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.head_dim=32",
                   "--model.d_ff=96", "--model.vocab_size=256"]


def synthetic_batch(batch: int, seq_len: int, vocab: int, packed: bool, seed: int) -> Batch:
    """Random tokens with next-token labels; packed rows hold documents of S/8..S/2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels = tokens.roll(-1, dims=1)
    if not packed:
        return Batch(tokens=tokens, labels=labels)
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row, seg = [], 1
        while len(row) < seq_len:
            row += [seg] * min(rng.randint(max(1, seq_len // 8), max(1, seq_len // 2)), seq_len - len(row))
            seg += 1
        rows.append(row)
    return Batch(tokens=tokens, labels=labels, segment_ids=torch.tensor(rows, dtype=torch.int32))


def choice_flags(choice: str) -> list[str]:
    """A CHOICES entry as --model flags, e.g. triton+tma/fused -> attention triton, TMA tiles, loss fused."""
    attention, sep, loss = choice.partition("/")
    impl, *modifiers = attention.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if not sep or unknown:
        raise SystemExit(f"--choices {choice}: write ATTENTION[+tma][+fused-bwd]/LOSS, e.g. triton+tma/fused")
    return [f"--model.attention={impl}", *(MODIFIERS[m] for m in modifiers), f"--model.loss={loss}"]


def measure(cfg, packed: bool, warmup: int, steps: int, peak_tflops: float) -> dict:
    resolved = resolve_auto(cfg)
    mesh = init_mesh(resolved)
    layout, _ = build_layout(resolved, mesh)
    optimizer = layout.build_optimizer()
    batch = synthetic_batch(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, packed, seed=0)
    batch = batch.to(mesh.device)
    cuda = mesh.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(mesh.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        train_step(layout, optimizer, batch, step)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch.tokens.numel()
    tflops = training_flops_per_token(cfg, seq_len=cfg.data.seq_len)["total"] * tokens / seconds / 1e12
    peak = torch.cuda.max_memory_allocated(mesh.device) / 2**30 if cuda else None
    del layout, optimizer  # the next kernel choice builds its own model: free this one first
    if cuda:
        torch.cuda.empty_cache()
    return dict(step_s=seconds, step_s_min=min(times), step_s_max=max(times), tokens_per_s=tokens / seconds,
                model_tflops=tflops, mfu=tflops / peak_tflops if peak_tflops else None, peak_gib=peak)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="preset, e.g. configs/gpu-125m.toml")
    p.add_argument("--smoke", action="store_true", help="CPU interpreter: a one-layer model, 2 x 32 tokens, 1 step")
    p.add_argument("--choices", nargs="+", default=CHOICES,
                   help="ATTENTION[+tma][+fused-bwd]/LOSS choices to run (default every one)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="per-device peak for MFU")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/sm90_train)")
    args, overrides = p.parse_known_args(argv)
    if args.smoke:
        overrides = [*SMOKE_OVERRIDES, *overrides]
        args.warmup, args.steps = 0, 1
    rows = []
    for choice in args.choices:
        cfg = load_config(args.config, [*overrides, *choice_flags(choice)])
        m = cfg.model
        for packed in (False, True):
            row = dict(choice=choice, layout="packed" if packed else "unpacked",
                       tokens=cfg.train.batch_size * cfg.data.seq_len)
            row.update(measure(cfg, packed, args.warmup, args.steps, args.peak_tflops))
            row.update(attention=m.attention, attention_tiles=m.attention_tiles,
                       attention_backward=m.attention_backward, loss=m.loss, config=args.config)
            rows.append(row)
            print(f"  {choice} {row['layout']}: {row['tokens_per_s']:.0f} tokens/s", flush=True)
    print_table(rows, ["choice", "layout", "tokens", "step_s", "tokens_per_s", "model_tflops", "mfu",
                       "peak_gib"], title=f"train_step throughput, {args.config}")
    out = output_dir("sm90_train", args.out)
    print(f"wrote {write_json(out / 'train.json', rows, dict(environment(), args=vars(args), overrides=overrides))}")


if __name__ == "__main__":
    main()
