"""The `flan` command under torchrun as two "nodes" on localhost logs the one-device run's losses and gradient
norms step for step: pretraining with tp=2 (and sequence parallelism), pretraining with dp=2 (each rank its
rows of the corpus's global batch) and instruction tuning with dp=2 and ZeRO-1 (each rank its rows of the
mixture's packed batch), which also records the clusters the mixture held out in run.json."""
from __future__ import annotations

import json

from launch import assert_same_logs, two_nodes_and_one_device

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.head_dim=16", "--model.d_ff=128", "--data.seq_len=32", "--train.batch_size=4", "--train.steps=5",
         "--train.val_every=0", "--train.ckpt_every=0", "--optim.warmup_steps=2"]
TUNE = ["--data.input_len=48", "--data.target_len=16", "--train.steps=3"]
TOLERANCE = 1e-5


def test_two_node_torchrun_tp2_logs_the_one_device_losses(tmp_path, shared_data):
    single, parallel = two_nodes_and_one_device(tmp_path, "tp2", 1, SMALL, ["--parallel.tp=2", "--parallel.sp=true"])
    assert_same_logs(single, parallel, steps=5, tolerance=TOLERANCE)


def test_two_node_torchrun_dp2_pretrain_logs_the_one_device_losses(tmp_path, shared_data):
    single, parallel = two_nodes_and_one_device(tmp_path, "dp2", 1, SMALL, ["--parallel.dp=2"])
    assert_same_logs(single, parallel, steps=5, tolerance=TOLERANCE)
    assert [r["target_tokens"] for r in parallel] == [r["target_tokens"] for r in single]


def test_two_node_torchrun_dp2_zero_tune_logs_the_one_device_losses(tmp_path, shared_data):
    single, parallel = two_nodes_and_one_device(tmp_path, "dp2", 1, SMALL + TUNE,
                                                ["--parallel.dp=2", "--parallel.zero=1"], command="tune")
    assert_same_logs(single, parallel, steps=3, tolerance=TOLERANCE)
    # The loss is normalised by the global batch's target count, summed over the ranks' rows.
    assert [r["target_tokens"] for r in parallel] == [r["target_tokens"] for r in single]
    record = json.loads((tmp_path / "dp2" / "run.json").read_text())
    assert record["kind"] == "tune" and record["heldout_clusters"] == ["nli", "paraphrase"]
    assert record["layout"]["dp"] == 2 and record["layout"]["zero"] == 1 and record["tokens_per_step"] == 4 * 64
