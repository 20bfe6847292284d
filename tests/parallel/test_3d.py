"""The three parallelisms composed: an 8-rank dp=2 x pp=2 x tp=2 layout equals the single-device model (loss,
every gradient, gradient norm, weights after 3 AdamW steps, within 1e-5 relative), and `flan pretrain` under a
two-"node" torchrun with pp=2 x tp=2 logs the one-device run's losses for 5 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import strategies as st
from launch import free_port, launch
from reference import TOLERANCE, compare_layout, draw_cases, make_config, model_shapes, relative_error

from engine import checkpoint as ckpt
from engine.paths import REPO_ROOT

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


def start(launcher: list[str], run_dir, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # five processes share the cores
    command = [*launcher, "-m", "flan", "pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={run_dir}", *flags]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-4000:]}"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_node_torchrun_pp2_tp2_logs_the_one_device_losses(tmp_path, shared_data):
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
                "--master-addr=127.0.0.1", f"--master-port={port}"]
    layout = ["--parallel.tp=2", "--parallel.pp=2", "--parallel.schedule=1f1b", "--parallel.microbatches=2"]
    nodes = [start([*torchrun, f"--node-rank={node}"], tmp_path / "pp2tp2", *layout) for node in (0, 1)]
    one = start([sys.executable], tmp_path / "one")
    for proc in (*nodes, one):
        finish(proc)
    single, parallel = metrics(tmp_path / "one"), metrics(tmp_path / "pp2tp2")
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == [1, 2, 3, 4, 5]
    for a, b in zip(single, parallel):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOLERANCE * abs(a[key]), (key, a, b)
    # The final checkpoint, gathered over pp and tp by rank 0, holds the one-device weights.
    saved = [ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / run)) for run in ("one", "pp2tp2")]
    assert saved[0].keys() == saved[1].keys()
    for name, want in saved[0].items():
        assert relative_error(saved[1][name], want) < 1e-4, name
