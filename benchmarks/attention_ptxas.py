"""Registers, spills, shared memory and MMA instructions of every attention tile candidate on Hopper,
compiled as the JIT compiles them at run time, without a GPU; and the autotune lists chosen from them.

    python -m benchmarks.attention_ptxas          # sm_90a, bf16, D 64 and 128, +-segments, MHA and GQA
    python -m benchmarks.attention_ptxas --out benchmarks/results/attention-ptxas-sm90   # the recorded table

Each kernel of kernels/attention_fwd.py and kernels/attention_bwd.py is compiled for sm_90a with each
candidate of CANDIDATES and with the specialisation Triton's JIT applies at run time to the inputs that
flash_attention passes (`aligned` guarantees them): every pointer and every stride divisible by 16
(`tt.divisibility`), and the sequence length too (a multiple of 16, as training lengths are). Without
those attributes the compiler must assume scalar, unaligned accesses: no vector loads, no cp.async/TMA,
and a table that misreports registers and shared memory. The JIT also turns an integer argument equal
to 1 into a constant, so a multi-head model (Hq = Hkv) runs kernels compiled with `group` = 1 folded
in (no loop over a GQA group in dK/dV), and a grouped-query one runs them with `group` a run-time
value: each candidate is compiled both ways (column `group`: 1, or "n" for any other value).
ptxas (bundled with Triton, `-v`) reports registers per thread and spill bytes; the PTX gives the
wgmma shapes (m64nNk16) and any mma.sync, and whether tiles move by cp.async or by TMA
(cp.async.bulk.tensor). The "_tma" kernels are the TMA path (flash_attention(tma=True)): their
descriptors are made in the kernel, so each program also needs `scratch_bytes` of global memory (128
per descriptor), which the compile reports.

A config is kept for a head dim (`choose`) when, in every row (with and without segments, MHA and
GQA), it spills nothing, fits in one H100/H200 SM's 227 KiB of shared memory, and runs on wgmma with
N >= 32 and no mma.sync (an m64n16 wgmma, from 16-row steps, moves a quarter of an n64's work per
instruction issued). The result is written as `chosen` in the JSON; kernels/attention_configs.py
holds it and tests/benchmarks checks that it matches the recorded table. Must not run under
TRITON_INTERPRET=1 (the interpreter compiles nothing).

ptxas is not bit-for-bit deterministic on the same PTX: between uncached runs of the whole table
(TRITON_ALWAYS_COMPILE=1), 5 to 8 of the 296 rows differed, all of them TMA dK/dV tiles that spill
(none chosen), by 8 to 88 bytes of spills or one register; the chosen lists were the same every time.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from tqdm import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.harness import environment, output_dir, print_table, write_json
from kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from kernels.attention_fwd import attn_fwd_kernel

# Candidate (BLOCK_A, BLOCK_B, warps, stages) per kernel. fwd/dq: BLOCK_A queries per program, BLOCK_B keys
# per step; dkdv: BLOCK_A queries per step, BLOCK_B keys per program.
FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)]
DQ_TILES = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)]
DKDV_TILES = [(64, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 2), (32, 128, 8, 1), (64, 64, 4, 3),
              (16, 128, 8, 3)]
# name -> (autotuned kernel, extra constexprs, candidates). "_tma": the same kernel with its tiles moved
# by TMA tensor descriptors (kernels/attention_io.py), which chooses its own list.
CANDIDATES = {
    "fwd": (attn_fwd_kernel, {"TMA": False}, FWD_TILES),
    "dq": (attn_bwd_dq_kernel, {"TMA": False}, DQ_TILES),
    "dkdv": (attn_bwd_dkdv_kernel, {"FUSED_DQ": False, "TMA": False}, DKDV_TILES),
    "dkdv_fused": (attn_bwd_dkdv_kernel, {"FUSED_DQ": True, "TMA": False},
                   [(64, 128, 8, 2), (64, 128, 8, 1), (32, 128, 8, 1)]),
    "fwd_tma": (attn_fwd_kernel, {"TMA": True}, FWD_TILES),
    "dq_tma": (attn_bwd_dq_kernel, {"TMA": True}, DQ_TILES),
    "dkdv_tma": (attn_bwd_dkdv_kernel, {"FUSED_DQ": False, "TMA": True}, DKDV_TILES),
}
FP32_POINTERS = ("LSE", "DELTA", "DQ_ACC")
INT32_POINTERS = ("SEG", "BOUNDS")
FLOAT_SCALARS = ("qk_scale", "softmax_scale")
NOT_DIVISIBLE = ("n_heads", "n_kv_heads", "group")  # head counts: any value
SMEM_LIMIT_KIB = 227  # usable shared memory per block on H100/H200
MIN_WGMMA_N = 32  # m64n16 (16-row steps) is the narrowest; the issue drops the 16x32, 32x32, 16x64 tiles
GROUPS = (1, "n")  # the `group` argument: 1 as the JIT specialises it (MHA), "n" any other value (GQA)
COLUMNS = ["kernel", "D", "segments", "group", "BLOCK_A", "BLOCK_B", "warps", "stages", "smem_kib", "scratch_bytes",
           "registers", "spill_bytes", "wgmma", "mma_sync", "cp_async", "tma"]


def signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """(Triton type strings of every argument, run-time specialisation attributes by argument index)."""
    types, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
            continue
        if name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name.isupper() and name != "SEQ_BUCKET":
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
        if types[name].startswith("*") or (types[name] == "i32" and name not in NOT_DIVISIBLE):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return types, attrs


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes that `ptxas -v` reports for one PTX module."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(registers=int(registers.group(1)) if registers else None,
                spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None)


def mma_usage(ptx: str) -> dict:
    """wgmma shapes (sorted, e.g. "m64n64k16"), the count of mma.sync, and whether cp.async / TMA appear."""
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)),
                    key=lambda s: int(re.search(r"n(\d+)", s).group(1)))
    return dict(wgmma=" ".join(shapes), mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                cp_async="cp.async" in ptx, tma="cp.async.bulk.tensor" in ptx)


def fits(row: dict) -> bool:
    """The kept-config rule of the module docstring, for one compiled row."""
    narrow = [int(n) for n in re.findall(r"n(\d+)k", row["wgmma"])]
    return (row["spill_bytes"] == 0 and row["smem_kib"] <= SMEM_LIMIT_KIB and row["mma_sync"] == 0
            and bool(narrow) and min(narrow) >= MIN_WGMMA_N)


def choose(rows: list[dict]) -> dict[str, dict[str, list[list[int]]]]:
    """Per kernel and head dim (a string key, as JSON has it), the candidates in CANDIDATES order that
    fit in every row (with and without segments, MHA and GQA). Where none fits, the one that spills
    least among those meeting the other rules (`least_spilling`), so the kernel still has a config; the
    table shows its spills."""
    chosen = {}
    for kernel, (_, _, candidates) in CANDIDATES.items():
        chosen[kernel] = {}
        for head_dim in sorted({r["D"] for r in rows if r["kernel"] == kernel}):
            keep = []
            for config in candidates:
                mine = [r for r in rows if r["kernel"] == kernel and r["D"] == head_dim and
                        (r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"]) == tuple(config)]
                if mine and all(fits(r) for r in mine):
                    keep.append(list(config))
            chosen[kernel][str(head_dim)] = keep or least_spilling(rows, kernel, head_dim)
    return chosen


def least_spilling(rows: list[dict], kernel: str, head_dim: int) -> list[list[int]]:
    """[the config whose worst spill (over segment and group settings) is smallest, all other rules met], or []."""
    worst, excluded = {}, set()
    for r in rows:
        if r["kernel"] != kernel or r["D"] != head_dim:
            continue
        config = (r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"])
        if not fits(dict(r, spill_bytes=0)):
            excluded.add(config)
        worst[config] = max(worst.get(config, 0), r["spill_bytes"])
    usable = {c: spill for c, spill in worst.items() if c not in excluded}
    return [list(min(usable, key=usable.get))] if usable else []


def compile_row(kernel_name: str, head_dim: int, has_segments: bool, config, dtype: str, arch: int,
                group=GROUPS[1]) -> dict:
    """One row of the table; group 1 compiles with `group` a constant, as the JIT does for MHA launches."""
    kernel, extra, _ = CANDIDATES[kernel_name]
    block_a, block_b, warps, stages = config
    constexprs = dict(HEAD_DIM=head_dim, CAUSAL=True, HAS_SEGMENTS=has_segments,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_A=block_a, BLOCK_B=block_b,
                      **extra, **({"group": 1} if group == 1 else {}))
    fn = kernel.fn  # the JITFunction under the autotuner
    types, attrs = signature(fn, dtype, constexprs)
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    return dict(kernel=kernel_name, D=head_dim, segments=has_segments, group=group, BLOCK_A=block_a, BLOCK_B=block_b,
                warps=warps, stages=stages, smem_kib=compiled.metadata.shared / 1024,
                scratch_bytes=compiled.metadata.global_scratch_size, **ptxas_usage(ptx, arch), **mma_usage(ptx))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kernels", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--out", default=None, help="output folder (default runs/bench/attention_ptxas)")
    args = p.parse_args(argv)
    if triton.knobs.runtime.interpret:
        raise SystemExit("attention_ptxas: unset TRITON_INTERPRET; the interpreter does not compile kernels")
    jobs = [(name, head_dim, has_segments, config, group) for head_dim in args.head_dims
            for has_segments in (False, True) for group in GROUPS for name in args.kernels
            for config in CANDIDATES[name][2]]
    rows = [compile_row(name, head_dim, has_segments, config, args.dtype, args.arch, group)
            for name, head_dim, has_segments, config, group in tqdm(jobs, desc="compile", unit="kernel")]
    print_table(rows, COLUMNS, title=f"sm_{args.arch}a {args.dtype}, run-time alignment: registers, spills, MMA")
    chosen = choose(rows)
    for kernel, by_dim in chosen.items():
        for head_dim, configs in by_dim.items():
            print(f"chosen {kernel} D={head_dim}: {[tuple(c) for c in configs]}")
    out = output_dir("attention_ptxas", args.out)
    meta = dict(environment(), args=vars(args), chosen=chosen,
                command=" ".join(["python -m benchmarks.attention_ptxas", *(sys.argv[1:] if argv is None else argv)]))
    print(f"wrote {write_json(out / 'ptxas.json', rows, meta)}")
    (out / "ptxas.md").write_text(markdown(rows, COLUMNS, chosen, args, meta))


def markdown(rows, columns, chosen, args, meta) -> str:
    lines = [f"# Attention tiles on sm_{args.arch}a ({args.dtype}), compiled with run-time alignment", "",
             f"Commit {meta['commit']}, {meta['time_utc']}, Triton {meta['triton']}, no GPU: `{meta['command']}`.", "",
             "Compile-time figures (ptxas -v and the PTX), not GPU measurements. "
             "Regenerate: `python -m benchmarks.attention_ptxas --out benchmarks/results/attention-ptxas-sm90`. "
             "Kernels named `*_tma` are the TMA path (`flash_attention(tma=True)`, tiles through tensor descriptors); "
             "`scratch_bytes` is the global memory each of their programs needs for its descriptors.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", "Chosen (kernels/attention_configs.py):", ""]
    lines += [f"- {kernel} D={head_dim}: {[tuple(c) for c in configs]}" for kernel, by_dim in chosen.items()
              for head_dim, configs in by_dim.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
