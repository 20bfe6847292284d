"""`flan pretrain` under torchrun as two "nodes" on localhost with tp=2 (and sequence parallelism) logs the same
losses and gradient norms as the one-device run, step for step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from launch import free_port

from engine.paths import REPO_ROOT

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.head_dim=16", "--model.d_ff=128", "--data.seq_len=32", "--train.batch_size=4", "--train.steps=5",
         "--train.val_every=0", "--train.ckpt_every=0", "--optim.warmup_steps=2"]
TOLERANCE = 1e-5


def start(launcher: list[str], run_dir, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # three processes share the cores
    command = [*launcher, "-m", "flan", "pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={run_dir}", *flags]
    return subprocess.Popen(command,
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-4000:]}"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_node_torchrun_tp2_logs_the_one_device_losses(tmp_path, shared_data):
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={port}"]
    nodes = [start([*torchrun, f"--node-rank={node}"], tmp_path / "tp2", "--parallel.tp=2", "--parallel.sp=true")
             for node in (0, 1)]
    one = start([sys.executable], tmp_path / "one")
    for proc in (*nodes, one):
        finish(proc)
    single, parallel = metrics(tmp_path / "one"), metrics(tmp_path / "tp2")
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == [1, 2, 3, 4, 5]
    for a, b in zip(single, parallel):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOLERANCE * abs(a[key]), (key, a, b)
