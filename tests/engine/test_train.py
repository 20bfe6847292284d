"""The training loop: loss falls, metrics are logged (JSONL and TensorBoard), run.json records the run, resume
is bit-exact, checkpoints are atomic."""
import json
import re

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import load_config
from engine.corpus import CorpusStream
from engine.data_source import RankSlice
from engine.tokenizer import load_tokenizer
from engine.train import train

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
         "--model.head_dim=32", "--model.d_ff=128", "--data.seq_len=32", "--train.batch_size=4",
         "--optim.warmup_steps=2"]


def run(tmp_path, name, *flags):
    cfg = load_config("configs/tiny.toml", SMALL + [f"--train.run_dir={tmp_path / name}", *flags])
    tok = load_tokenizer(cfg)
    train(cfg, lambda c, rank, size: RankSlice(CorpusStream(c, tok), rank, size))
    return [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_metrics_have_every_field(tmp_path, shared_data):
    rows = run(tmp_path, "a", "--train.steps=30", "--train.val_every=15", "--train.val_batches=2",
               "--optim.lr=3e-3", "--train.grad_accum=2")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "target_tokens", "tflops_per_s", "time"):
        assert all(key in r for r in rows), key
    assert all(r["target_tokens"] == 4 * 32 for r in rows)  # every position of a corpus row has a target
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[-1] - times[0] < 600  # wall-clock seconds, in logging order
    assert [r["step"] for r in rows if "val_loss" in r] == [15, 30]
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_resume_is_bit_exact(tmp_path, shared_data):
    straight = run(tmp_path, "straight", "--train.steps=6", "--train.ckpt_every=0", "--train.val_every=0")
    run(tmp_path, "resumed", "--train.steps=3", "--train.ckpt_every=3", "--train.val_every=0")
    # An interrupted run: its last lines were logged after the checkpoint and must be dropped on resume.
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = run(tmp_path, "resumed", "--train.steps=6", "--train.ckpt_every=3", "--train.val_every=0",
                  "--train.resume=true")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight]
    a = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "straight"))
    b = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_atomic_pruned_and_checked(tmp_path, shared_data):
    run(tmp_path, "c", "--train.steps=4", "--train.ckpt_every=1", "--train.val_every=0", "--train.keep_checkpoints=2")
    root = ckpt.checkpoint_dir(tmp_path / "c")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "c")] == ["step-000003", "step-000004"]
    # A half-written folder (no COMPLETE marker) is never picked.
    half = root / "step-000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path / "c").name == "step-000004"
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker"):
        ckpt.load_model_state(half)
    # A truncated shard names the file.
    latest = root / "step-000004"
    data = (latest / "model-r00000.safetensors").read_bytes()
    (latest / "model-r00000.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"step-000004/model-r00000.safetensors: .* truncated"):
        ckpt.load_model_state(latest)
    # Weights that do not fit the configured model name the tensor and both shapes.
    from engine.model import build_model

    state = ckpt.load_model_state(root / "step-000003")
    other = build_model(load_config("configs/tiny.toml", SMALL + ["--model.d_ff=96"]).model, 0)
    with pytest.raises(ckpt.CheckpointError, match=r"tensor 'layers.0.mlp.w_gate.weight' has shape \(128, 64\)"):
        ckpt.apply_model_state(other, state, root / "step-000003")
    # Checkpoint files carry no pickle.
    for f in (root / "step-000003").iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f


def test_adafactor_and_constant_schedule_train(tmp_path, shared_data):
    # Adafactor scales its steps by each weight's RMS (0.02 here): a rate of 0.1 moves it as AdamW's 2e-3 would.
    flags = ["--train.steps=4", "--optim.schedule=constant", "--optim.lr=0.1", "--train.val_every=0",
             "--train.ckpt_every=0"]
    ada = run(tmp_path, "f", "--optim.name=adafactor", *flags)
    adam = run(tmp_path, "g", *flags)
    assert [r["lr"] for r in ada] == [0.05, 0.1, 0.1, 0.1]  # 2 warm-up steps, then constant
    assert ada[0]["loss"] == adam[0]["loss"]  # the same weights and batch before any update
    assert ada[1]["loss"] != adam[1]["loss"]  # ... then the optimizers differ
    assert ada[-1]["loss"] < ada[0]["loss"] - 0.05
    index = ckpt.load_meta(ckpt.latest_checkpoint(tmp_path / "f"))
    assert index["config"]["optim"]["name"] == "adafactor"
    assert "layers.0.mlp.w_up.weight/row_var" in index["bound_state"]  # Adafactor's factored moment


def test_run_json_records_provenance_and_tensorboard_mirrors_the_metrics(tmp_path, shared_data):
    from engine.info import parameter_table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = run(tmp_path, "p", "--train.steps=3", "--train.val_every=3", "--train.val_batches=1",
               "--train.tensorboard=true")
    record = json.loads((tmp_path / "p" / "run.json").read_text())
    cfg = load_config("configs/tiny.toml", SMALL + [f"--train.run_dir={tmp_path / 'p'}", "--train.steps=3",
                                                    "--train.val_every=3", "--train.val_batches=1",
                                                    "--train.tensorboard=true"])
    assert record["kind"] == "pretrain" and record["parameters"] == sum(parameter_table(cfg).values())
    assert record["layout"] == {"dp": 1, "pp": 1, "tp": 1, "sp": False, "virtual_stages": 1, "schedule": "none",
                                "microbatches": 1, "zero": 0, "recompute": "none"}
    assert record["tokens_per_step"] == 4 * 32 and record["world_size"] == 1
    assert record["kernels"] == {"attention": "torch", "attention_tiles": "pointers", "attention_backward": "split",
                                 "loss": "torch"} and record["precision"] == "fp32"
    assert record["config"] == cfg.to_dict() and record["config"]["model"]["attention"] == "auto"  # as written
    assert re.fullmatch(r"[0-9a-f]{64}", record["config_hash"])
    assert record["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", record["commit"])
    assert record["init_from"] is None and record["heldout_clusters"] == []
    run(tmp_path, "q", "--train.steps=3", "--train.val_every=3", "--train.val_batches=1", "--optim.lr=1e-3")
    other = json.loads((tmp_path / "q" / "run.json").read_text())
    assert other["config_hash"] != record["config_hash"]

    events = EventAccumulator(str(tmp_path / "p" / "tensorboard"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert logged["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert logged["val/loss"] == [(3, pytest.approx(rows[-1]["val_loss"]))]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(logged)


def test_a_finished_run_is_never_overwritten_and_mfu_is_reported(tmp_path, shared_data):
    from engine.config import ConfigError

    rows = run(tmp_path, "m", "--train.steps=2", "--train.val_every=0", "--train.peak_tflops=1.0")
    assert all(r["tflops_per_s"] > 0 and r["mfu"] == r["tflops_per_s"] / 1.0 for r in rows)
    before = (tmp_path / "m" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest step-000002\); pass --train.resume=true"):
        run(tmp_path, "m", "--train.steps=2", "--train.val_every=0")
    assert (tmp_path / "m" / "metrics.jsonl").read_text() == before
    again = run(tmp_path, "m", "--train.steps=2", "--train.val_every=0", "--train.resume=true")
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]  # a finished run resumes to no new step
