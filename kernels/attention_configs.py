"""Autotune candidates of the attention kernels and the key they are tuned on.

Each list holds (BLOCK_A, BLOCK_B, num_warps, num_stages). Forward and dQ: BLOCK_A query rows per
program, BLOCK_B keys per step (BLOCK_A % BLOCK_B == 0, so the causal diagonal starts on a key-tile
boundary). dK/dV: BLOCK_A queries per step, BLOCK_B keys per program (BLOCK_B % BLOCK_A == 0, mirrored).

How the GPU lists were chosen: `python -m benchmarks.attention_ptxas` compiles every kernel for sm_90a
with the pointer and stride divisibility (16 bytes) that Triton's JIT specialises on at run time, at head
dims 64 and 128 with and without segments, and records registers, spills, shared memory and the wgmma
instruction shapes (benchmarks/results/attention-ptxas-sm90/). A config stays when it fits in 255
registers without spills, in the 227 KiB of shared memory of one H100/H200 SM, and compiles to wgmma
(not mma.sync or the narrowest wgmma shapes). Which one wins is left to the autotuner on the GPU.
dK/dV leads with 64 queries x 128 keys on 8 warps, the tile FA2, FA3 and FlexAttention use.
Under Triton's CPU interpreter one small config: tuning there only wastes time; 16 is the smallest
tile tl.dot accepts.
"""
from __future__ import annotations

import triton

FWD_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]
DKDV_CONFIGS = [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3)]
INTERPRETER_TILES = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}

# Retune per power-of-two sequence length rather than per exact length, so evaluation batches of many
# lengths do not each trigger a tuning run.
AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_SEGMENTS"]


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def autotune_configs(kernel: str) -> list[triton.Config]:
    """triton.Config candidates of one kernel ("fwd", "dq" or "dkdv")."""
    gpu = {"fwd": FWD_CONFIGS, "dq": DQ_CONFIGS, "dkdv": DKDV_CONFIGS}[kernel]
    chosen = [(*INTERPRETER_TILES[kernel], 1, 1)] if interpreting() else gpu
    return [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s) for a, b, w, s in chosen]
