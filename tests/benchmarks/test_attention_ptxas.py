"""benchmarks/attention_ptxas.py: the recorded sm_90a table (pointer and TMA paths), the choice rule, and the
autotune lists that kernels/attention_configs.py holds (they must be the table's choice)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.attention_ptxas import CANDIDATES, GROUPS, choose, fits, signature
from kernels import attention_configs

TUNED = ("fwd", "dq", "dkdv", "fwd_tma", "dq_tma", "dkdv_tma")  # the lists the kernels' autotuners hold
TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "attention-ptxas-sm90" / "ptxas.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(TABLE.read_text())


def test_table_covers_every_candidate_with_the_runtime_attributes(recorded):
    rows = recorded["rows"]
    for kernel, (_, _, candidates) in CANDIDATES.items():
        for head_dim in (64, 128):
            for segments in (False, True):
                for group in GROUPS:
                    got = {(r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"]) for r in rows
                           if r["kernel"] == kernel and r["D"] == head_dim and r["segments"] == segments
                           and r["group"] == group}
                    assert got == set(candidates), f"{kernel} D={head_dim} {segments=} {group=}: regenerate"
    assert all(r["cp_async"] for r in rows if r["stages"] > 1), "aligned, pipelined configs load by cp.async"


def test_autotune_lists_are_the_tables_choice(recorded):
    chosen = choose(recorded["rows"])
    assert chosen == recorded["meta"]["chosen"]
    for kernel in TUNED:
        for head_dim, configs in chosen[kernel].items():
            held = attention_configs.GPU_CONFIGS[kernel][int(head_dim)]
            assert held == [tuple(c) for c in configs], (kernel, head_dim)
            assert configs, f"{kernel} D={head_dim}: no usable candidate"


def spill_free(rows: list[dict], kernel: str, head_dim: int, configs: list[list[int]]) -> bool:
    return all(fits(r) for r in rows if r["kernel"] == kernel and r["D"] == head_dim
               and [r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"]] in configs)


def test_chosen_configs_fit_without_spills(recorded):
    """The issue's done-criterion: every kernel's chosen configs, pointer and TMA path, at head dims 64
    and 128, spill nothing in any recorded setting (segments or not, MHA or GQA)."""
    rows, chosen = recorded["rows"], recorded["meta"]["chosen"]
    for kernel in TUNED:
        for head_dim in (64, 128):
            assert spill_free(rows, kernel, head_dim, chosen[kernel][str(head_dim)]), (kernel, head_dim)


def test_tma_rows_move_their_tiles_by_tma(recorded):
    """Every `_tma` row compiled to TMA copies (cp.async.bulk.tensor) and asks for descriptor scratch
    (128 bytes per descriptor: fwd q/k/v/o, dQ q/do/k/v/dq, dK/dV k/v/q/do/dk/dv); no pointer row does."""
    descriptors = {"fwd_tma": 4, "dq_tma": 5, "dkdv_tma": 6}
    for r in recorded["rows"]:
        assert r["tma"] == (r["kernel"] in descriptors), r
        assert r["scratch_bytes"] == 128 * descriptors.get(r["kernel"], 0), r


def test_the_tma_variant_compiles_for_sm90_here():
    """The kernels as they are now (not only the recorded table) compile their TMA path for sm_90a on a
    machine without a GPU. In a subprocess: the tests run under the interpreter, which compiles nothing."""
    code = ("from benchmarks.attention_ptxas import compile_row; import json; "
            "print(json.dumps(compile_row('fwd_tma', 64, True, (128, 32, 8, 3), 'bf16', 90)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=TABLE.parents[3])
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["tma"] and row["scratch_bytes"] == 512 and row["spill_bytes"] == 0 and row["mma_sync"] == 0


def test_fit_rule_and_alignment_attributes():
    row = dict(spill_bytes=0, smem_kib=100.0, mma_sync=0, wgmma="m64n64k16 m64n128k16")
    assert fits(row)
    assert not fits(dict(row, spill_bytes=8))
    assert fits(dict(row, wgmma="m64n32k16 m64n64k16"))
    assert not fits(dict(row, wgmma="m64n16k16 m64n64k16"))
    assert not fits(dict(row, mma_sync=4, wgmma=""))
    assert not fits(dict(row, smem_kib=230.0))
    fn = CANDIDATES["fwd"][0].fn
    types, attrs = signature(fn, "bf16", {"HEAD_DIM": 64, "CAUSAL": True, "HAS_SEGMENTS": True,
                                          "DOT_PRECISION": "tf32", "BLOCK_A": 128, "BLOCK_B": 64})
    marked = {fn.arg_names[i] for (i,) in attrs}
    assert {"Q", "K", "LSE", "BOUNDS", "stride_qs", "stride_kb", "seq_len"} <= marked
    assert not marked & {"n_heads", "group", "qk_scale", "HEAD_DIM"}
    assert types["group"] == "i32"
    mha, _ = signature(fn, "bf16", {"group": 1, "HEAD_DIM": 64})  # what the JIT makes of group == 1
    assert mha["group"] == "constexpr" and mha["n_heads"] == "i32"
