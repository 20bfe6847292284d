"""Sharded checkpoints across layouts, on real gloo processes.

One 4-process launch saves under tp=2 x pp=2 and loads under one device, tp=4 and pp=2 x dp=2 with ZeRO-1
(each with its own weights first, so that only the checkpoint can make them equal): weights and optimizer
state equal the single-device reference bit for bit, logits (and the pipeline's loss) within 1e-5 of the largest; then the
ZeRO-1 layout saves and one device loads that. Two more launches train under tp=2: a run resumed at step 3
logs the same losses as the uninterrupted one, bit for bit, and resumed on one device within 1e-5. Last, a
torchrun job under tp=2 has its rank 1 killed with SIGKILL in the middle of a save: the previous checkpoint
stays the newest loadable one and `--train.resume=true` continues from it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zlib

import pytest
import torch
from launch import free_port, launch

from engine import checkpoint as ckpt
from engine.batch import Batch
from engine.config import load_config, resolve_auto
from engine.data_source import RankSlice
from engine.model import build_model
from engine.parallel import Mesh, init_mesh, parallelize
from engine.paths import REPO_ROOT

TOLERANCE = 1e-5
SHAPE = ["--model.d_model=32", "--model.n_layers=4", "--model.n_heads=4", "--model.n_kv_heads=4",
         "--model.head_dim=8", "--model.d_ff=64", "--model.vocab_size=64", "--data.seq_len=16",
         "--optim.warmup_steps=0"]


def config(*flags):
    return resolve_auto(load_config("configs/tiny.toml", SHAPE + list(flags)), cuda_available=False)


def global_grad(name: str, shape, step: int) -> torch.Tensor:
    """The same gradient for a global tensor whatever the layout holds of it."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * step)
    return torch.randn(shape, generator=g)


def region(t: torch.Tensor, box) -> torch.Tensor:
    return t[tuple(slice(a, b) for a, b in box)]


def take_steps(layout, optimizer, steps: int = 2) -> None:
    """AdamW steps with seeded gradients: elementwise, so every layout's state is the reference's, sliced."""
    specs = layout.shard_specs()
    for step in range(steps):
        for name, p in layout.named_parameters():
            spec = specs[name]
            p.grad = region(global_grad(spec.global_name, spec.global_shape, step), spec.box).clone()
        optimizer.step()


def one_device(cfg, seed: int):
    """A single-device layout of a freshly initialised model, and its optimizer."""
    layout = parallelize(build_model(cfg.model, seed), cfg, Mesh())
    return layout, layout.build_optimizer()


def reference(cfg):
    layout, optimizer = one_device(cfg, 0)
    take_steps(layout, optimizer)
    return layout.model, optimizer


def batch(cfg, labels: bool) -> Batch:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=g)
    segments = torch.ones_like(tokens, dtype=torch.int32)
    segments[:, 9:] = 2
    return Batch(tokens=tokens, labels=tokens.roll(-1, 1) if labels else None, segment_ids=segments)


def state_mismatches(layout, optimizer, ref_model, ref_opt) -> list[str]:
    """Names whose weights or (non-ZeRO) AdamW state differ from the reference's regions."""
    ref = dict(ref_model.named_parameters())
    specs = layout.shard_specs()
    bad = []
    for name, p in layout.named_parameters():
        spec = specs[name]
        if not torch.equal(p.detach(), region(ref[spec.global_name].detach(), spec.box)):
            bad.append(name)
        for key, value in optimizer.state.get(p, {}).items() if hasattr(optimizer, "state") else ():
            expected = ref_opt.state[ref[spec.global_name]][key]
            if not torch.equal(value, expected if value.ndim == 0 else region(expected, spec.box)):
                bad.append(f"{name}/{key}")
    return bad


def zero_mismatches(optimizer, layout, ref_model, ref_opt) -> list[str]:
    """ZeRO-1 flat shards against the reference state of the parameters each bucket slice covers."""
    ref = dict(ref_model.named_parameters())
    names = {id(p): n for n, p in layout.named_parameters()}
    bad = []
    for i, (shard, bucket) in enumerate(zip(optimizer.shards, optimizer.sync.buckets)):
        lo, hi = optimizer.sync.shard_range(bucket)
        for key in ("exp_avg", "exp_avg_sq", "weights"):
            flat = torch.zeros(bucket.numel)
            for p, offset in zip(bucket.params, bucket.offsets):
                source = ref[names[id(p)]] if key == "weights" else ref_opt.state[ref[names[id(p)]]][key]
                flat[offset:offset + p.numel()] = source.detach().reshape(-1)
            held = shard.detach() if key == "weights" else optimizer.inner.state[shard][key]
            if not torch.equal(held, flat[lo:hi]):
                bad.append(f"bucket {i} {key}")
    return bad


def _across_layouts(root: str) -> dict:
    out = {}
    ref_model, ref_opt = reference(config())
    with torch.no_grad():
        ref_logits = ref_model(batch(config(), labels=False))
        ref_loss = ref_model(batch(config(), labels=True), loss_reduction="sum")

    # Saved under tp=2 x pp=2.
    cfg = config("--parallel.tp=2", "--parallel.pp=2")
    mesh = init_mesh(cfg)
    layout = parallelize(build_model(cfg.model, 0), cfg, mesh)
    optimizer = layout.build_optimizer()
    take_steps(layout, optimizer)
    out["saved_state"] = state_mismatches(layout, optimizer, ref_model, ref_opt)
    saved = ckpt.Checkpointer(f"{root}/a", mesh, keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})

    if mesh.rank == 0:  # one device, no collectives
        single, single_opt = one_device(config(), 7)
        ckpt.load_checkpoint(saved, single, single_opt)
        out["one_device_state"] = state_mismatches(single, single_opt, ref_model, ref_opt)
        with torch.no_grad():
            out["one_device_logits_equal"] = torch.equal(single.model(batch(config(), labels=False)), ref_logits)

    # tp=4.
    cfg = config("--parallel.tp=4")
    mesh = init_mesh(cfg)
    layout = parallelize(build_model(cfg.model, 7), cfg, mesh)
    optimizer = layout.build_optimizer()
    ckpt.load_checkpoint(saved, layout, optimizer)
    out["tp4_state"] = state_mismatches(layout, optimizer, ref_model, ref_opt)
    with torch.no_grad():
        logits = layout.model(batch(cfg, labels=False))
    out["tp4_logits_error"] = float((logits - ref_logits).abs().max() / ref_logits.abs().max())

    # pp=2 x dp=2 with ZeRO-1 (small buckets, so that slices split tensors mid-row).
    cfg = config("--parallel.pp=2", "--parallel.dp=2", "--parallel.zero=1", "--parallel.bucket_mb=0.01")
    mesh = init_mesh(cfg)
    layout = parallelize(build_model(cfg.model, 7), cfg, mesh)
    optimizer = layout.build_optimizer()
    ckpt.load_checkpoint(saved, layout, optimizer)
    out["pp2dp2_weights"] = state_mismatches(layout, optimizer, ref_model, ref_opt)
    out["pp2dp2_zero_state"] = zero_mismatches(optimizer, layout, ref_model, ref_opt)
    loss = layout.summed_loss(batch(cfg, labels=True))
    out["pp2dp2_loss_error"] = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))

    # ... which saves its ZeRO-1 slices, and one device loads them.
    resaved = ckpt.Checkpointer(f"{root}/c", mesh, keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    if mesh.rank == 0:
        single, single_opt = one_device(config(), 7)
        ckpt.load_checkpoint(resaved, single, single_opt)
        out["from_zero_state"] = state_mismatches(single, single_opt, ref_model, ref_opt)
        index = ckpt.load_meta(resaved)
        out["zero_writers"] = sorted({p["file"] for e in index["tensors"].values() if e["kind"] == "optim"
                                      for p in e["pieces"]})
    return out


def test_tp2_pp2_checkpoint_loads_under_one_device_tp4_and_pp2_dp2_zero(tmp_path):
    results = launch(_across_layouts, 4, str(tmp_path))
    for rank, r in enumerate(results):
        assert r["saved_state"] == [] and r["tp4_state"] == [], rank
        assert r["pp2dp2_weights"] == [] and r["pp2dp2_zero_state"] == [], rank
        assert r["tp4_logits_error"] < TOLERANCE and r["pp2dp2_loss_error"] < TOLERANCE, r
    first = results[0]
    assert first["one_device_state"] == [] and first["one_device_logits_equal"]
    assert first["from_zero_state"] == []
    assert first["zero_writers"] == [f"optim-r{r:05d}.safetensors" for r in range(4)]  # every dp rank its slice


TRAIN = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=2",
         "--model.head_dim=16", "--model.d_ff=64", "--data.seq_len=32", "--train.batch_size=4",
         "--optim.warmup_steps=2", "--train.val_every=0", "--train.steps=6", "--train.ckpt_every=3"]


def _train(run_dir: str, *flags: str) -> list[float]:
    from engine.corpus import CorpusStream
    from engine.tokenizer import load_tokenizer
    from engine.train import train

    cfg = load_config("configs/tiny.toml", TRAIN + [f"--train.run_dir={run_dir}", *flags])
    tok = load_tokenizer(cfg)
    train(cfg, lambda c, rank, size: RankSlice(CorpusStream(c, tok), rank, size))
    return [json.loads(line)["loss"] for line in open(f"{run_dir}/metrics.jsonl")]


def _resumable_copy(straight, name: str):
    """A run folder holding the uninterrupted run's step-3 checkpoint and first 3 metric lines."""
    run = straight.parent / name
    shutil.copytree(straight / "checkpoints" / "step-000003", run / "checkpoints" / "step-000003")
    lines = (straight / "metrics.jsonl").read_text().splitlines()[:3]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_resume_after_three_steps_same_layout_exact_other_layout_close(tmp_path, shared_data):
    straight = tmp_path / "straight"
    losses = launch(_train, 2, str(straight), "--parallel.tp=2")[0]
    same = _resumable_copy(straight, "same")
    resumed = launch(_train, 2, str(same), "--parallel.tp=2", "--train.resume=true")[0]
    assert resumed == losses  # the same layout: bit for bit
    other = _resumable_copy(straight, "other")
    one_device = _train(str(other), "--train.resume=true")
    assert one_device[:3] == losses[:3]
    assert one_device[3:] == pytest.approx(losses[3:], rel=TOLERANCE, abs=0)


KILLED_RUN = """
import os, sys, time
from engine.checkpoint import save
from engine.config import load_config
from engine.corpus import CorpusStream
from engine.data_source import RankSlice
from engine.tokenizer import load_tokenizer
from engine.train import train

real_save_file = save.save_file

def slow_save_file(tensors, path):
    real_save_file(tensors, path)
    if "step-000004" in path and os.environ["RANK"] == "1":  # rank 1 stalls after its first file of step 4
        print(f"SAVING {os.getpid()}", flush=True)
        time.sleep(600)

save.save_file = slow_save_file
cfg = load_config("configs/tiny.toml", sys.argv[1:])
tok = load_tokenizer(cfg)
train(cfg, lambda c, rank, size: RankSlice(CorpusStream(c, tok), rank, size))
"""


def test_rank_killed_during_a_save_leaves_the_previous_checkpoint_and_resume_continues(tmp_path, shared_data):
    run = tmp_path / "run"
    flags = TRAIN + ["--train.ckpt_every=1", "--train.keep_checkpoints=2", f"--train.run_dir={run}"]
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}"]
    proc = subprocess.Popen([*torchrun, str(script), *flags, "--parallel.tp=2"], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT)))
    watchdog = threading.Timer(180, proc.kill)  # never hang the suite if the stall is never reached
    watchdog.start()
    try:
        for line in proc.stdout:
            if "SAVING " in line:  # torchrun may prefix a worker's lines with its rank
                os.kill(int(line.split("SAVING ")[1]), signal.SIGKILL)
                break
        proc.communicate(timeout=120)  # torchrun sees the dead rank and stops the other
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    root = ckpt.checkpoint_dir(run)
    assert list(root.glob(".tmp-step-000004-*/model-r00001.safetensors"))  # caught mid-save
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002", "step-000003"]

    # The resume here runs on one device: the checkpoint of the killed tp=2 job reshards.
    losses = _train(str(run), "--train.ckpt_every=1", "--train.keep_checkpoints=2", "--train.resume=true")
    assert len(losses) == 6  # steps 1-3 from before the kill, 4-6 resumed from step 3's checkpoint
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000005", "step-000006"]
    assert not list(root.glob(".tmp-*"))  # the killed save's folder is cleaned up by the next commit
