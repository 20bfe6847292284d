"""benchmarks/attention_ptxas.py: the recorded sm_90a table, the choice rule, and the autotune lists that
kernels/attention_configs.py holds (they must be the table's choice)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.attention_ptxas import CANDIDATES, choose, fits, signature
from kernels import attention_configs

TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "attention-ptxas-sm90" / "ptxas.json"


@pytest.fixture(scope="module")
def recorded():
    return json.loads(TABLE.read_text())


def test_table_covers_every_candidate_with_the_runtime_attributes(recorded):
    rows = recorded["rows"]
    for kernel, (_, _, candidates) in CANDIDATES.items():
        for head_dim in (64, 128):
            for segments in (False, True):
                got = {(r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"]) for r in rows
                       if r["kernel"] == kernel and r["D"] == head_dim and r["segments"] == segments}
                assert got == set(candidates), f"{kernel} D={head_dim} segments={segments}: regenerate the table"
    assert all(r["cp_async"] for r in rows if r["stages"] > 1), "aligned, pipelined configs load by cp.async"


def test_autotune_lists_are_the_tables_choice(recorded):
    chosen = choose(recorded["rows"])
    assert chosen == recorded["meta"]["chosen"]
    for kernel in ("fwd", "dq", "dkdv"):
        for head_dim, configs in chosen[kernel].items():
            held = attention_configs.GPU_CONFIGS[kernel][int(head_dim)]
            assert held == [tuple(c) for c in configs], (kernel, head_dim)
            assert configs, f"{kernel} D={head_dim}: no usable candidate"


def spill_free(rows: list[dict], kernel: str, head_dim: int, configs: list[list[int]]) -> bool:
    return all(fits(r) for r in rows if r["kernel"] == kernel and r["D"] == head_dim
               and [r["BLOCK_A"], r["BLOCK_B"], r["warps"], r["stages"]] in configs)


def test_chosen_configs_fit_without_spills_where_the_table_allows(recorded):
    """What the issue's done-criterion asks: true for fwd and dQ at 64 and 128, and dK/dV at 64; dK/dV at
    128 still spills in every candidate (the report says so), and this test will say when that changes."""
    rows, chosen = recorded["rows"], recorded["meta"]["chosen"]
    got = {(k, d): spill_free(rows, k, d, chosen[k][str(d)]) for k in ("fwd", "dq", "dkdv") for d in (64, 128)}
    assert got == {(k, d): (k, d) != ("dkdv", 128) for k in ("fwd", "dq", "dkdv") for d in (64, 128)}


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
