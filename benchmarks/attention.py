"""Attention benchmark: our Triton flash kernel (split and fused backward; with --tma also its TMA
descriptor path) against SDPA (flash, cuDNN, efficient), FlexAttention, and FlashAttention 2/3 where installed.

    python -m benchmarks.attention                       # GPU: S 512..16k, D 64/128, bf16, causal
    python -m benchmarks.attention --tma --providers triton triton-tma   # TMA vs pointer path only (sm_90)
    python -m benchmarks.attention --smoke               # CPU (Triton interpreter), tiny shapes, end to end
    python -m benchmarks.attention --check-bf16 --out benchmarks/results/attention-<gpu>   # GPU correctness
    python -m benchmarks.attention --check fp16 --smoke  # the same check on the CPU interpreter, tiny shapes

Throughput follows FlashAttention's convention: forward FLOPs = 4 * B * H * S^2 * D, halved when
causal; backward = 2.5 x forward; forward+backward = 3.5 x forward. Packed rows (documents of mixed
lengths 256..2048 laid end to end) count only the attention they contain, sum over documents of
L^2 / 2, so equal TFLOP/s for packed and unpacked rows means a packed row costs in proportion to its
work. SDPA cannot express a document mask with its flash or cuDNN backends, so on packed rows only our
kernel and FlexAttention (document mask via create_block_mask) run.
Each row of the table is one (pass, provider, layout, D, S); an unavailable provider prints '-' and its
reason is kept in the JSON. Results go to runs/bench/attention (git-ignored) unless --out is given.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import torch

if not torch.cuda.is_available():  # the CPU path runs the kernel through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.harness import environment, measure, output_dir, plot_lines, print_table, write_json  # noqa: E402
from kernels.attention import attention_reference, attention_segments, flash_attention  # noqa: E402

PASSES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("triton", "triton-fused-bwd", "triton-tma", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
             "flex", "fa2", "fa3")  # every name provider_functions may give
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def document_ids(batch: int, seq_len: int, min_len: int, max_len: int, seed: int) -> torch.Tensor:
    """(B, S) int32 segment ids: documents of uniform random length in [min_len, max_len], the last cut to fit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row, seg_id = [], 1
        while len(row) < seq_len:
            row += [seg_id] * min(rng.randint(min_len, max_len), seq_len - len(row))
            seg_id += 1
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32)


def forward_flops(segment_ids: torch.Tensor | None, batch: int, seq_len: int, heads: int, head_dim: int) -> float:
    """Causal forward FLOPs in FlashAttention's convention: 4 * H * D * (S^2 / 2) per row, per document if packed."""
    if segment_ids is None:
        return 4.0 * batch * heads * head_dim * seq_len**2 / 2
    work = 0.0
    for row in segment_ids.cpu():  # per row: a row's last document and the next row's first may share an id
        ids, lengths = torch.unique_consecutive(row, return_counts=True)
        work += float((lengths[ids != 0].double() ** 2).sum()) / 2
    return 4.0 * heads * head_dim * work


def our_providers(segment_ids, tma: bool) -> dict:
    """name -> our flash_attention(q, k, v) variants: the default, the fused backward and, if tma, the TMA path.
    segment_ids: (B, S) ids, their `attention_segments`, or None."""
    variants = {"triton": {}, "triton-fused-bwd": {"fused_backward": True}}
    if tma:
        variants["triton-tma"] = {"tma": True}
    return {name: (lambda q, k, v, kw=kw: flash_attention(q, k, v, causal=True, segment_ids=segment_ids, **kw))
            for name, kw in variants.items()}


def provider_functions(segment_ids: torch.Tensor | None, device: torch.device, compile_flex: bool,
                       tma: bool = False) -> dict:
    """name -> attention(q, k, v) on (B, S, H, D) tensors, for the providers that can run this layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=q.shape[2] != k.shape[2])
            return out.transpose(1, 2)
        return run

    if segment_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx
    else:
        docs = segment_ids.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)
    # Compiled, FlexAttention generates one fused kernel per mask; eager it materialises the scores.
    # Every (S, D, layout) recompiles, beyond dynamo's default limit of 8, after which it would silently
    # fall back to eager: raise the limit for this process.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    flex_fn = torch.compile(flex_attention) if compile_flex else flex_attention
    block_masks = {}

    def flex(q, k, v):
        key = (q.shape[0], q.shape[1])
        if key not in block_masks:  # built once per shape, outside the timed calls after warm-up
            block_masks[key] = create_block_mask(mask_mod, key[0] if segment_ids is not None else None, None,
                                                 key[1], key[1], device=str(device))
        out = flex_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_masks[key],
                      enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)

    segments = None if segment_ids is None else attention_segments(segment_ids)  # once, as the model does
    providers = our_providers(segments, tma)
    if segment_ids is None:
        if device.type == "cuda":
            providers["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
            providers["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
            providers["sdpa-efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
            providers.update(flash_attn_providers())
        else:
            providers["sdpa-math"] = sdpa(SDPBackend.MATH)
    providers["flex"] = flex
    return providers


def flash_attn_providers() -> dict:
    """FlashAttention 2 (`flash_attn`) and 3 (`flash_attn_interface`, Hopper) where installed; both take
    (B, S, H, D) and GQA natively. Packed rows would need their varlen API: not compared there."""
    found = {}
    try:
        from flash_attn import flash_attn_func as fa2
        found["fa2"] = lambda q, k, v: fa2(q, k, v, causal=True)
    except ImportError:
        pass
    try:
        from flash_attn_interface import flash_attn_func as fa3

        def run_fa3(q, k, v):
            out = fa3(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out  # some releases also return the lse
        found["fa3"] = run_fa3
    except ImportError:
        pass
    return found


def pass_callable(attn, pass_name: str, q, k, v, grad_out):
    """The callable timed for one pass; backward alone replays the graph of one forward."""
    if pass_name == "fwd":
        return lambda: attn(q, k, v)
    if pass_name == "bwd":
        out = attn(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), grad_out)


def benchmark(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter cannot compute bf16
    rows = []
    for head_dim in args.head_dims:
        heads = args.model_dim // head_dim
        kv_heads = heads // args.kv_group
        for seq_len in args.seq_lens:
            batch = max(1, args.tokens // seq_len)
            for layout in ("unpacked", "packed"):
                segment_ids = None if layout == "unpacked" else document_ids(
                    batch, seq_len, args.doc_min, args.doc_max, seed=seq_len).to(device)
                flops = forward_flops(segment_ids, batch, seq_len, heads, head_dim)
                gen = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(batch, seq_len, h, head_dim, generator=gen, device=device, dtype=dtype)
                           .requires_grad_() for h in (heads, kv_heads, kv_heads))
                grad_out = torch.randn_like(q)
                for provider, attn in provider_functions(segment_ids, device, device.type == "cuda",
                                                         args.tma).items():
                    if args.providers and provider not in args.providers:
                        continue
                    for pass_name in PASSES:
                        row = {"pass": pass_name, "provider": provider, "layout": layout, "D": head_dim,
                               "S": seq_len, "B": batch, "H": heads, "Hkv": kv_heads, "ms": None, "tflops": None,
                               "peak_mib": None, "error": None}
                        try:
                            m = measure(pass_callable(attn, pass_name, q, k, v, grad_out), device=device,
                                        warmup=args.warmup, reps=args.reps)
                            row.update(ms=m.ms, peak_mib=m.peak_mib,
                                       tflops=PASS_FLOP_FACTOR[pass_name] * flops / (m.ms * 1e-3) / 1e12)
                        except (RuntimeError, ValueError) as err:  # an unavailable backend raises a RuntimeError subclass
                            # A peer's backend may be missing for this shape or device (recorded, shown as
                            # '-'); a failure of our own kernel is a bug, except running out of memory.
                            if provider == "triton" and not isinstance(err, torch.OutOfMemoryError):
                                raise
                            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        rows.append(row)
                        timing = "unavailable" if row["ms"] is None else f"{row['ms']:.3f} ms"
                        print(f"  {pass_name:8s} {provider:10s} {layout:8s} D={head_dim} S={seq_len}: {timing}",
                              file=sys.stderr)
    return rows


def packing_summary(rows: list[dict]) -> list[dict]:
    """Per (D, S): our fwd+bwd time and TFLOP/s packed vs unpacked; equal TFLOP/s = cost proportional to work."""
    ours = {(r["layout"], r["D"], r["S"]): r for r in rows
            if r["provider"] == "triton" and r["pass"] == "fwd+bwd" and r["ms"] is not None}
    summary = []
    for (layout, D, S), packed in sorted(ours.items()):
        unpacked = ours.get(("unpacked", D, S))
        if layout == "packed" and unpacked is not None:
            summary.append(dict(D=D, S=S, packed_ms=packed["ms"], unpacked_ms=unpacked["ms"],
                                time_ratio=packed["ms"] / unpacked["ms"],
                                packed_tflops=packed["tflops"], unpacked_tflops=unpacked["tflops"]))
    return summary


CHECK_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECK_TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}  # relative Frobenius error, as in the tests


def check_cases(smoke: bool) -> list[tuple[int, int, int, int, str]]:
    """(D, S, Hq, Hkv, layout) for the correctness check; tiny under --smoke (the CPU interpreter)."""
    if smoke:
        return [(32, 40, 2, 1, "unpacked"), (64, 50, 2, 2, "packed+padding")]
    shapes = [(128, 4, 4, "unpacked"), (1000, 8, 2, "unpacked"), (1000, 8, 2, "packed+padding"),
              (2048, 8, 1, "packed+padding")]
    return [(D, *shape) for D in (32, 64, 128) for shape in shapes]


def check_correctness(args) -> list[dict]:
    """Outputs and grads of our kernel (and of SDPA flash on a GPU) in args.check dtype vs the fp32 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = CHECK_DTYPES[args.check]
    if dtype == torch.bfloat16 and device.type != "cuda":
        raise SystemExit("--check bf16 needs a CUDA GPU: Triton's CPU interpreter does not compute bfloat16; "
                         "on the CPU run --check fp16 or --check fp32")
    tolerance = CHECK_TOLERANCE[args.check]

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)

    rows = []
    for head_dim, seq_len, heads, kv_heads, layout in check_cases(args.smoke):
        batch = 2
        segment_ids = None
        if layout != "unpacked":
            segment_ids = document_ids(batch, seq_len, 1, seq_len // 3, seed=seq_len).to(device)
            segment_ids[:, seq_len - seq_len // 10:] = 0  # padding at the end of each row
        gen = torch.Generator(device=device).manual_seed(head_dim + seq_len)
        q, k, v = (torch.randn(batch, seq_len, h, head_dim, generator=gen, device=device)
                   for h in (heads, kv_heads, kv_heads))
        grad_out = torch.randn(batch, seq_len, heads, head_dim, generator=gen, device=device)

        def outputs(fn, out_dtype):
            leaves = [t.to(out_dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*leaves)
            return [out, *torch.autograd.grad(out, leaves, grad_out.to(out_dtype))]

        ref = outputs(lambda *t: attention_reference(*t, causal=True, segment_ids=segment_ids), torch.float32)
        candidates = our_providers(segment_ids, args.tma)
        if segment_ids is None and device.type == "cuda" and dtype != torch.float32:
            candidates["sdpa-flash"] = sdpa_flash  # the error a production kernel makes, for scale
        for provider, fn in candidates.items():
            row = dict(provider=provider, dtype=args.check, layout=layout, D=head_dim, S=seq_len, Hq=heads,
                       Hkv=kv_heads)
            try:
                errors = {f"rel_{name}": ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()
                          for name, a, b in zip(("out", "dq", "dk", "dv"), outputs(fn, dtype), ref)}
            except (RuntimeError, ValueError) as err:
                # An optional path that fails to run (TMA on a device without it, say) is a failed row; the
                # other providers' rows are still checked and recorded, and the check exits non-zero.
                if provider == "triton":
                    raise
                rows.append(dict(row, ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
                continue
            rows.append(dict(row, **errors, ok=all(e <= tolerance for e in errors.values())))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (the default when no GPU is present)")
    p.add_argument("--check", choices=sorted(CHECK_DTYPES), default=None,
                   help="instead of timing: outputs/grads in this dtype vs the fp32 reference")
    p.add_argument("--check-bf16", dest="check", action="store_const", const="bf16", help="same as --check bf16 (GPU)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim / D (FlashAttention's setup)")
    p.add_argument("--kv-group", type=int, default=1, help="query heads per key/value head (GQA)")
    p.add_argument("--tma", action="store_true",
                   help="also run our TMA descriptor path (provider triton-tma; sm_90 or the interpreter)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                   help="time only these providers (default: every one available); not for --check")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens / S")
    p.add_argument("--doc-min", type=int, default=256, help="shortest packed document")
    p.add_argument("--doc-max", type=int, default=2048, help="longest packed document")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="output folder (default runs/bench/attention)")
    args = p.parse_args(argv)
    if args.smoke or not torch.cuda.is_available():
        args.smoke = True
        args.seq_lens, args.head_dims, args.model_dim, args.tokens = [32, 64], [32], 64, 64
        args.doc_min, args.doc_max, args.warmup, args.reps = 8, 24, 1, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = output_dir("attention", args.out)
    meta = dict(environment(), args=vars(args))
    if args.check:
        rows = check_correctness(args)
        print_table(rows, ["provider", "dtype", "layout", "D", "S", "Hq", "Hkv", "rel_out", "rel_dq", "rel_dk",
                           "rel_dv", "ok"],
                    title=f"{args.check} vs the fp32 reference (relative Frobenius error, "
                          f"tolerance {CHECK_TOLERANCE[args.check]})")
        print(f"wrote {write_json(out / f'check_{args.check}.json', rows, meta)}")
        if not all(r["ok"] for r in rows if r["provider"].startswith("triton")):
            raise SystemExit(f"{args.check} check failed: see the table above")
        return
    rows = benchmark(args)
    for pass_name in PASSES:
        in_pass = [r for r in rows if r["pass"] == pass_name]
        print_table(in_pass, ["provider", "layout", "D", "S", "B", "ms", "tflops", "peak_mib"],
                    title=f"{pass_name} ({'fp32, CPU interpreter smoke' if args.smoke else 'bf16'}, causal)")
        plot_lines(in_pass, x="S", y="tflops", series=("provider", "layout"), panels="D",
                   path=out / f"tflops_{pass_name.replace('+', '_')}.png", title=f"attention {pass_name}")
    summary = packing_summary(rows)
    print_table(summary, ["D", "S", "packed_ms", "unpacked_ms", "time_ratio", "packed_tflops", "unpacked_tflops"],
                title="packed vs unpacked rows, our fwd+bwd (equal TFLOP/s: cost in proportion to work)")
    print(f"wrote {write_json(out / 'results.json', rows, dict(meta, packing=summary))} and plots in {out}")


if __name__ == "__main__":
    main()
