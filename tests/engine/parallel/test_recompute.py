"""Activation recomputation equals no recomputation: "selective" and "full" under one device, tp with sp and
dp, pp with every schedule (interleaved included) and tp, each against the single-device model without
recomputation (loss, every gradient, gradient norm and weights after 3 AdamW steps, 1e-5 relative), through
the training loop's own train_step on real gloo processes."""
from __future__ import annotations

import pytest
from launch import launch
from reference import compare_layout

from engine.parallel import Mesh

MODEL = dict(vocab_size=16, d_model=8, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16, tie_embeddings=True)


def case(mode: str, **parallel) -> dict:
    return dict(model=MODEL, seq_len=8, rows=8, seed=5, parallel=dict(recompute=mode, **parallel))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_one_device(mode):
    assert not compare_layout(case(mode), Mesh())


def recompute_worker(cases: list[dict]) -> list[str]:
    from reference import make_config

    from engine.parallel import init_mesh

    failures = []
    for c in cases:  # every layout of the launch: its own groups, made in the same order on every rank
        failures += compare_layout(c, init_mesh(make_config(c["model"], c["seq_len"], **c["parallel"])))
    return failures


def test_every_layout_kind_on_four_ranks():
    layouts = [dict(tp=2, sp=True, zero=1, bucket_mb=1e-3),  # dp 2 x tp 2
               dict(tp=2, pp=2, schedule="1f1b", microbatches=2),
               dict(pp=2, schedule="interleaved", virtual_stages=2, microbatches=2),  # dp 2 x pp 2
               dict(pp=4, schedule="gpipe", microbatches=4)]
    cases = [case(mode, **p) for p in layouts for mode in ("selective", "full")]
    failures = [f for rank in launch(recompute_worker, 4, cases, timeout=240) for f in rank]
    assert not failures, "\n".join(failures)
