"""Registers and spills of every attention autotune config on Hopper, without a GPU.

    python -m benchmarks.attention_ptxas                # sm_90, bf16, D 64 and 128, with/without segments

Each kernel of kernels/attention.py is compiled for sm_90 with each candidate config of its autotune
list, and the PTX is passed through the ptxas bundled with Triton (`-v`), which reports registers per
thread and bytes spilled to local memory. A config that spills is slow on the GPU however it is
scheduled; this table is how the candidate lists were chosen while no GPU was at hand. It runs on the
CPU in about a minute and must not run under TRITON_INTERPRET=1 (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks.harness import environment, output_dir, print_table, write_json
from kernels import attention

KERNELS = {  # name -> (autotuned kernel, its candidate configs)
    "fwd": (attention._attn_fwd_kernel, attention.FWD_CONFIGS),
    "bwd_dq": (attention._attn_bwd_dq_kernel, attention.DQ_CONFIGS),
    "bwd_dkdv": (attention._attn_bwd_dkdv_kernel, attention.DKDV_CONFIGS),
}
FP32_POINTERS = ("LSE", "DELTA")
INT32_POINTERS = ("SEG", "KV_BOUNDS", "Q_BOUNDS")
FLOAT_SCALARS = ("qk_scale", "softmax_scale")


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Triton type strings for every argument: tensors are the upper-case names, scalars 32-bit."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name.isupper() and name != "SEQ_BUCKET":
            types[name] = f"*{dtype}"
        else:
            types[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return types


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--out", default=None, help="output folder (default runs/bench/attention_ptxas)")
    args = p.parse_args(argv)
    if triton.knobs.runtime.interpret:
        raise SystemExit("attention_ptxas: unset TRITON_INTERPRET; the interpreter does not compile kernels")
    target = GPUTarget("cuda", args.arch, 32)
    rows = []
    for head_dim in args.head_dims:
        for has_segments in (False, True):
            for kernel_name, (kernel, configs) in KERNELS.items():
                for block_a, block_b, warps, stages in configs:
                    constexprs = dict(HEAD_DIM=head_dim, CAUSAL=True, HAS_SEGMENTS=has_segments,
                                      DOT_PRECISION="ieee" if args.dtype == "fp32" else "tf32",
                                      BLOCK_A=block_a, BLOCK_B=block_b)
                    fn = kernel.fn  # the JITFunction under the autotuner
                    source = ASTSource(fn=fn, signature=signature(fn, args.dtype, constexprs), constexprs=constexprs)
                    compiled = triton.compile(source, target=target, options=dict(num_warps=warps, num_stages=stages))
                    rows.append(dict(kernel=kernel_name, D=head_dim, segments=has_segments, BLOCK_A=block_a,
                                     BLOCK_B=block_b, warps=warps, stages=stages, smem_kib=compiled.metadata.shared / 1024,
                                     **ptxas_usage(compiled.asm["ptx"], args.arch)))
    print_table(rows, ["kernel", "D", "segments", "BLOCK_A", "BLOCK_B", "warps", "stages", "smem_kib", "registers",
                       "spill_bytes"], title=f"sm_{args.arch} {args.dtype}: ptxas registers and spills per config")
    out = output_dir("attention_ptxas", args.out)
    print(f"wrote {write_json(out / 'ptxas.json', rows, dict(environment(), args=vars(args)))}")


if __name__ == "__main__":
    main()
