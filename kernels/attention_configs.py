"""Autotune candidates of the attention kernels and the key they are tuned on.

Each entry is (BLOCK_A, BLOCK_B, num_warps, num_stages), listed per kernel and head dim. Forward and
dQ: BLOCK_A query rows per program, BLOCK_B keys per step (BLOCK_A % BLOCK_B == 0, so the causal
diagonal starts on a key-tile boundary). dK/dV: BLOCK_A queries per step, BLOCK_B keys per program
(BLOCK_B % BLOCK_A == 0, mirrored).

How the GPU lists were chosen: `python -m benchmarks.attention_ptxas` compiles every kernel for sm_90a
with the pointer and stride divisibility (16 bytes) that Triton's JIT specialises on at run time, at head
dims 64 and 128, with and without segments, and with `group` = 1 folded in (MHA, as the JIT specialises
an argument equal to 1) and as a run-time value (GQA); it records registers, spills, shared memory and
the wgmma instruction shapes (benchmarks/results/attention-ptxas-sm90/). A config stays when it fits in
255 registers without spills in all four settings, in the 227 KiB of shared memory of one H100/H200 SM,
and compiles to wgmma (not mma.sync, nor the narrowest m64n16 from 16-row steps). Which one wins is left
to the autotuner on the GPU. dK/dV's candidates lead with 64 queries x 128 keys on 8 warps, the tile
FA2, FA3 and FlexAttention use: it fits at head dim 64 (one stage), but at 128 its two 128 x 128 fp32
accumulators take half the registers and it spills by hundreds of bytes, so there dK/dV runs 32 x 128.
The TMA path (flash_attention(tma=True)) has lists of its own ("fwd_tma", ...), chosen by the same rule
from its rows of the table; the autotune key includes TMA, so the two paths tune apart.
Under Triton's CPU interpreter one small config: tuning there only wastes time; 16 is the smallest
tile tl.dot accepts.
"""
from __future__ import annotations

import triton

# Per kernel and head dim, best first, as `benchmarks.attention_ptxas.choose` picks them from the table in
# benchmarks/results/attention-ptxas-sm90/ (tests/benchmarks/test_attention_ptxas.py keeps them equal).
# Head dim 32 uses the 64 lists (smaller tiles only need fewer registers).
GPU_CONFIGS = {
    "fwd": {64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
            128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)]},
    "dq": {64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)],
           128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)]},
    "dkdv": {64: [(64, 128, 8, 1), (32, 128, 8, 2), (32, 128, 8, 1)],
             128: [(32, 128, 8, 1)]},
    # The opt-in TMA path (kernels/attention_io.py), chosen from its own rows of the table.
    "fwd_tma": {64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
                128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)]},
    "dq_tma": {64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 8, 3)],
               128: [(128, 64, 8, 2), (128, 32, 8, 3)]},
    "dkdv_tma": {64: [(32, 128, 8, 2), (32, 128, 8, 1)],
                 128: [(32, 128, 8, 2)]},
}
INTERPRETER_TILES = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}

# Retune per power-of-two sequence length rather than per exact length, so evaluation batches of many
# lengths do not each trigger a tuning run.
AUTOTUNE_KEY = ["SEQ_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_SEGMENTS", "TMA"]


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def _head_dim_list(kernel: str, head_dim: int, tma: bool) -> list[tuple[int, int, int, int]]:
    lists = GPU_CONFIGS[f"{kernel}_tma" if tma else kernel]
    return lists.get(head_dim, lists[64])


def autotune_configs(kernel: str) -> list[triton.Config]:
    """triton.Config candidates of one kernel ("fwd", "dq" or "dkdv"): the union over head dims and the
    pointer and TMA lists, which `prune_to_head_dim` narrows at launch."""
    if interpreting():
        chosen = [(*INTERPRETER_TILES[kernel], 1, 1)]
    else:
        chosen = list(dict.fromkeys(c for name in (kernel, f"{kernel}_tma") for configs in GPU_CONFIGS[name].values()
                                    for c in configs))
    return [triton.Config({"BLOCK_A": a, "BLOCK_B": b}, num_warps=w, num_stages=s) for a, b, w, s in chosen]


def prune_to_head_dim(kernel: str) -> dict:
    """The autotuner's `prune_configs_by`: keep the configs chosen for the launch's HEAD_DIM and path
    (pointers, or TMA descriptors)."""
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        keep = set(_head_dim_list(kernel, head_dim, kwargs.get("TMA", named_args.get("TMA", False))))
        return [c for c in configs
                if (c.kwargs["BLOCK_A"], c.kwargs["BLOCK_B"], c.num_warps, c.num_stages) in keep] or configs
    return {"early_config_prune": prune}
