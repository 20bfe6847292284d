"""`flan pretrain` under torchrun as two "nodes" on localhost with tp=2 (and sequence parallelism) logs the same
losses and gradient norms as the one-device run, step for step."""
from __future__ import annotations

from launch import assert_same_logs, two_nodes_and_one_device

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.head_dim=16", "--model.d_ff=128", "--data.seq_len=32", "--train.batch_size=4", "--train.steps=5",
         "--train.val_every=0", "--train.ckpt_every=0", "--optim.warmup_steps=2"]
TOLERANCE = 1e-5


def test_two_node_torchrun_tp2_logs_the_one_device_losses(tmp_path, shared_data):
    single, parallel = two_nodes_and_one_device(tmp_path, "tp2", 1, SMALL, ["--parallel.tp=2", "--parallel.sp=true"])
    assert_same_logs(single, parallel, steps=5, tolerance=TOLERANCE)
