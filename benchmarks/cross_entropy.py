"""Cross-entropy forward + backward: time and peak memory of kernels.cross_entropy and
kernels.cross_entropy.linear_cross_entropy against torch eager, torch.compile and Liger-Kernel.

    python benchmarks/cross_entropy.py                     # GPU: bf16, V 32k..256k x N 4k..64k, D 4096
    python benchmarks/cross_entropy.py --out benchmarks/results/cross_entropy-h200   # record a GPU run
    python benchmarks/cross_entropy.py --check-bf16        # GPU: bf16 loss and gradients against fp32
    python benchmarks/cross_entropy.py --smoke             # CPU: tiny fp32 shapes, Triton interpreter
    python benchmarks/cross_entropy.py --tokens 16384 --vocab 131072 --ignore-fraction 0.5   # one SFT-like case
    python benchmarks/cross_entropy.py --providers ours liger     # skip the slow-to-compile / OOM-prone peers

Liger-Kernel is optional: `pip install --no-deps .whl/liger_kernel-0.8.5-py3-none-any.whl` (the wheel is
carried to the GPU machine; `pip download --no-deps liger-kernel==0.8.5 -d .whl` fetches it).
Two operations, each fed pre-allocated inputs that require gradients:
  cross_entropy         logits (N, V) -> mean loss; torch = F.cross_entropy(logits.float()) as in the
                        model's reference path; "ours-separate-bwd" is the design alternative (statistics in
                        the forward, gradient kernel in the backward) built from the same kernels, so the
                        grad-in-forward choice of kernels/cross_entropy.py can be measured.
  linear_cross_entropy  hidden (N, D), weight (V, D) -> mean loss; torch materialises hidden @ weight.T.
Peak memory is what one forward + backward allocates above its inputs (CUDA only). A provider that runs
out of memory is recorded with status "oom". Writes results.json and ms/peak PNGs per operation.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the CPU runs the interpreter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import environment, measure, output_dir, plot_lines, print_table, write_json  # noqa: E402
import kernels.cross_entropy  # noqa: E402

ce = sys.modules["kernels.cross_entropy"]  # the module: `kernels.cross_entropy` is the function


class _SeparateBackwardCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy (no smoothing, no z-loss) the other way round: the forward only computes the row
    statistics and keeps the logits; the backward launches the gradient kernel with the saved logsumexp."""

    @staticmethod
    def forward(ctx, logits, target):
        n_rows, n_cols = logits.shape
        block_v, num_warps = ce.launch_config(n_cols, logits.device)
        stats = torch.empty(4, n_rows, device=logits.device, dtype=torch.float32)
        ce._cross_entropy_statistics_kernel[(n_rows,)](logits, logits.stride(0), target, stats, n_rows, 0, -100,
                                                       N_COLS=n_cols, BLOCK_V=block_v, SMOOTHING=False, num_warps=num_warps)
        lse = stats[0] + torch.log(stats[1])
        valid = target != -100
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, target, lse, count)
        return torch.where(valid, lse - stats[2], 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, lse, count = ctx.saved_tensors
        n_rows, n_cols = logits.shape
        block_v, num_warps = ce.launch_config(n_cols, logits.device)
        grad = torch.empty_like(logits)
        scale = (grad_output / count).to(torch.float32).reshape(1)
        ce._cross_entropy_gradient_kernel[(n_rows,)](
            logits, logits.stride(0), grad, grad.stride(0), target, lse, scale, 0, 0, n_cols, -100, 0.0, 0.0,
            N_COLS=n_cols, BLOCK_V=block_v, SMOOTHING=False, num_warps=num_warps)
        return grad, None


def torch_cross_entropy(logits, target):
    return F.cross_entropy(logits.float(), target)


def torch_linear_cross_entropy(hidden, weight, target):
    return F.cross_entropy((hidden @ weight.t()).float(), target)


def providers(op: str, device: torch.device) -> dict:
    """name -> loss function, or -> the reason it is skipped."""
    found: dict = {}
    if op == "cross_entropy":
        found["torch"] = torch_cross_entropy
        found["ours"] = ce.cross_entropy
        found["ours-separate-bwd"] = _SeparateBackwardCrossEntropy.apply
    else:
        found["torch"] = torch_linear_cross_entropy
        found["ours"] = ce.linear_cross_entropy
    if device.type == "cuda":
        found["torch.compile"] = torch.compile(torch_cross_entropy if op == "cross_entropy"
                                               else torch_linear_cross_entropy)
    else:
        found["torch.compile"] = "skipped: the CPU smoke run has no GPU to compile for"
    if device.type != "cuda":
        found["liger"] = "skipped: Liger-Kernel runs on CUDA only"
        return found
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as error:
        found["liger"] = f"skipped: liger-kernel is not installed ({error}); see this file's docstring"
        return found
    if op == "cross_entropy":
        found["liger"] = LigerCrossEntropyLoss()
    else:
        liger_flce = LigerFusedLinearCrossEntropyLoss()
        found["liger"] = lambda hidden, weight, target: liger_flce(weight, hidden, target)
    return found


def make_inputs(op: str, n: int, v: int, d: int, dtype: torch.dtype, device: torch.device, ignore_fraction: float,
                seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    target[torch.rand(n, device=device, generator=gen) < ignore_fraction] = -100
    if op == "cross_entropy":
        return [torch.randn(n, v, device=device, dtype=dtype, generator=gen).requires_grad_()], target
    hidden = torch.randn(n, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(v, d, device=device, dtype=dtype, generator=gen) / d**0.5).requires_grad_()
    return [hidden, weight], target


def bench_case(op, name, fn, n, v, d, dtype, device, args) -> dict:
    row = {"op": op, "provider": name, "N": n, "V": v, "D": d if op == "linear_cross_entropy" else None,
           "dtype": str(dtype).removeprefix("torch."), "ms": None, "peak_mib": None}
    if isinstance(fn, str):
        return {**row, "status": fn}
    leaves, target = make_inputs(op, n, v, d, dtype, device, args.ignore_fraction)

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    try:
        m = measure(lambda: fn(*leaves, target).backward(), device=device, warmup=args.warmup, reps=args.reps,
                    setup=clear_grads)
    except torch.cuda.OutOfMemoryError:
        return {**row, "status": "oom"}
    finally:
        del leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {**row, "ms": m.ms, "ms_min": m.ms_min, "ms_max": m.ms_max, "peak_mib": m.peak_mib, "status": "ok"}


def run_benchmark(args, device: torch.device, dtype: torch.dtype) -> None:
    rows = []
    for op in ("cross_entropy", "linear_cross_entropy"):
        found = {name: fn for name, fn in providers(op, device).items()
                 if args.providers is None or name in args.providers}
        for name, reason in found.items():
            if isinstance(reason, str):
                print(f"{op} / {name}: {reason}")
        for n in args.tokens:
            for v in args.vocab:
                for name, fn in found.items():
                    rows.append(bench_case(op, name, fn, n, v, args.dim, dtype, device, args))
                    if rows[-1]["status"] == "ok":
                        print(f"{op:>20} {name:>18} N={n:<6} V={v:<7} {rows[-1]['ms']:9.3f} ms  "
                              f"peak {rows[-1]['peak_mib']} MiB", flush=True)
    columns = ["op", "provider", "N", "V", "D", "dtype", "ms", "peak_mib", "status"]
    print_table(rows, columns, title=f"cross-entropy forward + backward on {device.type} ({dtype})")
    out = output_dir("cross_entropy", args.out)
    write_json(out / "results.json", rows, meta={**environment(), "args": vars(args)})
    for op in ("cross_entropy", "linear_cross_entropy"):
        op_rows = [r for r in rows if r["op"] == op]
        for metric in ("ms", "peak_mib"):
            if any(r[metric] is not None for r in op_rows):
                plot_lines(op_rows, x="V", y=metric, series="provider", panels="N", path=out / f"{op}-{metric}.png",
                           title=f"{op} fwd+bwd {metric}")
    print(f"\nwrote {out}")


def check_bf16(device: torch.device, out_dir) -> int:
    """bf16 loss and gradients of both functions against the float32 reference on the same bf16 values.

    Bounds: the loss is accumulated in float32, so 1e-3 relative; gradients are stored in bf16 (8
    significant bits, 4e-3 relative per value) and the fused path's matmuls run in bf16: 2e-2 of the
    largest value. Returns the number of failures.
    """
    rows, failures = [], 0
    opts = dict(label_smoothing=0.1, z_loss=1e-4)
    for n, v in [(4096, 32000), (4096, 50257), (2048, 128256)]:
        for op in ("cross_entropy", "cross_entropy-inplace", "linear_cross_entropy"):
            leaves, target = make_inputs(op.removesuffix("-inplace"), n, v, 1024, torch.bfloat16, device,
                                         ignore_fraction=0.2, seed=n + v)
            if op == "cross_entropy":
                loss = ce.cross_entropy(leaves[0], target, **opts)
            elif op == "cross_entropy-inplace":  # the model's path: the gradient overwrites an intermediate
                loss = ce.cross_entropy(leaves[0] * 1, target, inplace=True, **opts)
            else:
                loss = ce.linear_cross_entropy(leaves[0], leaves[1], target, **opts)
            grads = torch.autograd.grad(loss, leaves)
            refs = [leaf.detach().float().requires_grad_() for leaf in leaves]
            logits = refs[0] if op != "linear_cross_entropy" else refs[0] @ refs[1].t()
            ref_loss = ce.cross_entropy_reference(logits, target, **opts)
            ref_grads = torch.autograd.grad(ref_loss, refs)
            errors = {"loss": ((loss - ref_loss).abs() / ref_loss.abs()).item()}
            for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
                errors[f"grad{i}"] = ((grad.float() - ref).abs().max() / ref.abs().max()).item()
            ok = errors["loss"] <= 1e-3 and all(e <= 2e-2 for k, e in errors.items() if k != "loss")
            failures += not ok
            rows.append({"op": op, "N": n, "V": v, **errors, "ok": ok})
    print_table(rows, ["op", "N", "V", "loss", "grad0", "grad1", "ok"], title="bf16 against the float32 reference")
    write_json(output_dir("cross_entropy", out_dir) / "check_bf16.json", rows, meta=environment())
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="N values (GPU default 4k 16k 64k)")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="V values (GPU default 32k..256k)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="GPU: logits/weights dtype "
                        "(Liger's published figures are fp32 logits; compare at equal dtype)")
    parser.add_argument("--dim", type=int, default=4096, help="hidden size D of linear_cross_entropy")
    parser.add_argument("--providers", nargs="+", default=None,
                        help="only these (torch, torch.compile, liger, ours, ours-separate-bwd); default all")
    parser.add_argument("--ignore-fraction", type=float, default=0.0,
                        help="share of targets set to -100 (instruction tuning ignores its prompts: try 0.5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="output folder (default runs/bench/cross_entropy)")
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes; the default without a GPU")
    parser.add_argument("--check-bf16", action="store_true", help="GPU: bf16 accuracy check, then exit")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check_bf16:
        if device.type != "cuda":
            sys.exit("--check-bf16 needs a GPU: Triton's interpreter does not compute bfloat16")
        sys.exit(1 if check_bf16(device, args.out) else 0)
    if args.smoke or device.type != "cuda":
        # The interpreter runs each program in Python and does not compute bfloat16: tiny fp32 shapes.
        args.tokens, args.vocab = args.tokens or [32, 64], args.vocab or [500, 1024]
        args.dim, args.warmup, args.reps = 64, 1, 2
        run_benchmark(args, device, torch.float32)
    else:
        args.tokens, args.vocab = args.tokens or [4096, 16384, 65536], args.vocab or [32768, 65536, 131072, 262144]
        run_benchmark(args, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)


if __name__ == "__main__":
    main()
