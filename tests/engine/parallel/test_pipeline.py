"""Pipeline parallelism equals the single-device model: for pp in {2, 4}, every schedule, microbatches from 1 to
8 and 1 or 2 virtual stages, the loss, every gradient, the gradient norm and the weights after 3 AdamW steps
agree within 1e-5 relative, on real gloo processes in fp32, through the training loop's own seams.

Process start-up dominates, so hypothesis draws the cases in the parent and one launch per pp runs them all.
The cost model puts the output head on a stage of its own weight, so drawn shapes also vary the split.
"""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import launch
from reference import compare_layout, draw_cases, make_batch, make_config, model_shapes

from engine.model import build_model
from engine.parallel import init_mesh, parallelize
from engine.parallel.pipeline import split_layers, stage_layers


@st.composite
def pipeline_case(draw, pp: int, schedule: str, virtual: int) -> dict:
    M = draw(st.sampled_from(range(pp, 9, pp)) if schedule == "interleaved" else st.integers(1, 8))
    accum = draw(st.sampled_from([1, 2]))
    return dict(model=draw(model_shapes(min_layers=pp * virtual)), seq_len=draw(st.integers(3, 8)),
                rows=M * accum * draw(st.integers(1, 2)), grad_accum=accum, seed=draw(st.integers(0, 2**16)),
                parallel=dict(pp=pp, schedule=schedule, microbatches=M, virtual_stages=virtual))


def pipeline_worker(cases: list[dict]) -> list[str]:
    mesh = init_mesh(make_config(cases[0]["model"], cases[0]["seq_len"], **cases[0]["parallel"]))
    return [failure for case in cases for failure in compare_layout(case, mesh)]


@pytest.mark.parametrize("pp, per_kind", [(2, 3), (4, 2)])
def test_pipeline_equals_single_device(pp, per_kind):
    kinds = [("gpipe", 1), ("1f1b", 1), ("interleaved", 1), ("interleaved", 2)]
    drawn = [case for schedule, virtual in kinds for case in draw_cases(pipeline_case(pp, schedule, virtual), per_kind)]
    failures = [f for rank_failures in launch(pipeline_worker, pp, drawn, timeout=240) for f in rank_failures]
    assert not failures, "\n".join(failures)


def forward_only_worker() -> list[dict]:
    """The forward-only pass through an interleaved pp=2 layout, on every rank, against the plain model: the
    summed loss of a labelled batch, and hidden states and logits at chosen (row, position) pairs."""
    import torch

    model = dict(vocab_size=16, d_model=8, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    cfg = make_config(model, 6, pp=2, schedule="interleaved", virtual_stages=2, microbatches=2)
    batch = make_batch(3, 6, 16, seed=5)
    rows, positions = torch.tensor([0, 2, 2, 1]), torch.tensor([5, 0, 3, 4])
    layout = parallelize(build_model(cfg.model, 7), cfg, init_mesh(cfg))
    single = build_model(cfg.model, 7)
    with torch.no_grad():
        hidden = single(batch, return_hidden=True)[rows, positions]
        want = {"loss": single(batch, loss_reduction="sum"), "hidden": hidden, "logits": single.output(hidden)}
    got = {"loss": layout.summed_loss(batch), "hidden": layout.hidden_at(batch, rows, positions),
           "logits": layout.logits_at(batch, rows, positions)}
    return [{k: float((got[k] - want[k]).norm() / want[k].norm()) for k in want},
            {k: tuple(got[k].shape) for k in got}]


def test_the_forward_only_pass_through_pipeline_stages_equals_the_plain_model():
    for errors, shapes in launch(forward_only_worker, 2):
        assert shapes == {"loss": (), "hidden": (4, 8), "logits": (4, 16)}
        assert all(e < 1e-5 for e in errors.values()), errors


def test_stages_are_balanced_by_compute():
    # 8 blocks over 4 stages with a head worth 2 blocks: the last stage takes fewer layers, and the spare
    # layer goes late (early stages hold the most microbatches' activations under 1F1B).
    assert [len(r) for r in split_layers(8, 4, last_extra=2.0)] == [2, 2, 3, 1]
    assert [len(r) for r in split_layers(8, 4)] == [2, 2, 2, 2]
    # Interleaving: rank 1 of pp=2 with 2 chunks holds global stages 1 and 3.
    assert stage_layers(8, 2, 1, virtual=2) == [range(2, 4), range(6, 8)]


@settings(max_examples=60, deadline=None)
@given(n_layers=st.integers(1, 10), stages=st.integers(1, 5), extra=st.floats(0, 6))
def test_stage_split_covers_every_layer_once_and_is_optimal(n_layers, stages, extra):
    if n_layers < stages:
        with pytest.raises(ValueError, match="cannot be split into parallel.pp x parallel.virtual_stages"):
            split_layers(n_layers, stages, extra)
        return
    ranges = split_layers(n_layers, stages, extra)
    assert [i for r in ranges for i in r] == list(range(n_layers)) and all(len(r) >= 1 for r in ranges)

    def costliest(counts) -> float:
        return max(k + (extra if s == stages - 1 else 0) for s, k in enumerate(counts))

    # Against every split (cut points between layers), by brute force.
    best = min(costliest([b - a for a, b in zip((0, *cuts), (*cuts, n_layers))])
               for cuts in itertools.combinations(range(1, n_layers), stages - 1))
    assert costliest([len(r) for r in ranges]) == pytest.approx(best)
