"""The three parallelisms composed: an 8-rank dp=2 x pp=2 x tp=2 layout equals the single-device model (loss,
every gradient, gradient norm, weights after 3 AdamW steps, within 1e-5 relative), and `flan pretrain` under a
two-"node" torchrun with pp=2 x tp=2 logs the one-device run's losses for 5 steps."""
from __future__ import annotations

from hypothesis import strategies as st
from launch import assert_same_logs, launch, two_nodes_and_one_device
from reference import TOLERANCE, compare_layout, draw_cases, make_config, model_shapes, relative_error

from engine import checkpoint as ckpt

TP, PP, DP = 2, 2, 2


@st.composite
def three_d_case(draw, schedule: str, virtual: int, sp: bool, zero: int) -> dict:
    M = PP * draw(st.integers(1, 2))
    return dict(model=draw(model_shapes(min_layers=PP * virtual, tp=TP)), seq_len=TP * draw(st.integers(2, 4)),
                rows=DP * M * draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**16)),
                parallel=dict(tp=TP, pp=PP, sp=sp, schedule=schedule, microbatches=M, virtual_stages=virtual,
                              zero=zero, bucket_mb=1e-3))


def three_d_worker(cases: list[dict]) -> list[str]:
    mesh = init_mesh_for(cases[0])
    return [f for case in cases for f in compare_layout(case, mesh)]


def init_mesh_for(case: dict):
    from engine.parallel import init_mesh

    return init_mesh(make_config(case["model"], case["seq_len"], **case["parallel"]))


def test_dp2_pp2_tp2_equals_single_device():
    drawn = (draw_cases(three_d_case("1f1b", 1, sp=False, zero=0), 1)
             + draw_cases(three_d_case("interleaved", 2, sp=True, zero=1), 1)
             + draw_cases(three_d_case("gpipe", 1, sp=True, zero=0), 1))
    failures = [f for rank_failures in launch(three_d_worker, DP * PP * TP, drawn, timeout=300) for f in rank_failures]
    assert not failures, "\n".join(failures)


SMALL = ["--model.d_model=32", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.head_dim=8", "--model.d_ff=64", "--data.seq_len=16", "--train.batch_size=4", "--train.steps=5",
         "--train.val_every=0", "--train.ckpt_every=0", "--optim.warmup_steps=2"]


def test_two_node_torchrun_pp2_tp2_logs_the_one_device_losses(tmp_path, shared_data):
    layout = ["--parallel.tp=2", "--parallel.pp=2", "--parallel.schedule=1f1b", "--parallel.microbatches=2"]
    single, parallel = two_nodes_and_one_device(tmp_path, "pp2tp2", 2, SMALL, layout)
    assert_same_logs(single, parallel, steps=5, tolerance=TOLERANCE)
    # The final checkpoint, gathered over pp and tp by rank 0, holds the one-device weights.
    saved = [ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / run)) for run in ("one", "pp2tp2")]
    assert saved[0].keys() == saved[1].keys()
    for name, want in saved[0].items():
        assert relative_error(saved[1][name], want) < 1e-4, name
