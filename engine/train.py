"""One training loop for pretraining and instruction tuning.

    flan pretrain configs/tiny.toml
    torchrun --nproc-per-node=2 -m flan pretrain configs/tiny.toml --parallel.tp=2

Every step's loss is the sum over the global batch's target tokens divided by their count, whatever the
layout: each micro-batch contributes its summed loss over that global count, so gradient accumulation and
every parallel layout reproduce the single-device step. Writes <run_dir>/metrics.jsonl (one object per
optimizer step, and `val_loss` lines), <run_dir>/run.json, checkpoints, and <run_dir>/loss.png at the end.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.batch import Batch
from engine.config import Config, ConfigError
from engine.info import training_flops_per_token
from engine.model import build_model
from engine.optim import lr_at, set_lr
from engine.parallel import comm
from engine.parallel import (Mesh, arm_last_backward, build_parallel_optimizer, clip_grad_norm, finalize_grads,
                             init_mesh, local_batch, parallelize, pipeline_forward_backward, step_loss)


class BatchSource(Protocol):
    """What the loop needs from a data stream (the corpus for pretraining, the FLAN mixture for tuning)."""

    def next_batch(self) -> Batch: ...
    def val_batches(self, n: int) -> list[Batch]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def autocast(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model: torch.nn.Module, batch: Batch, cfg: Config, mesh: Mesh, total_targets: int) -> torch.Tensor:
    """Run this rank's micro-batches and accumulate gradients; returns the global step loss (on every rank)."""
    if mesh.pp > 1:
        loss = pipeline_forward_backward(model, batch, cfg, mesh, total_targets, lambda: autocast(cfg, mesh.device))
        return step_loss(loss, mesh)
    rows = batch.tokens.shape[0]
    micro = max(1, -(-rows // cfg.train.grad_accum))
    loss = torch.zeros((), device=mesh.device)
    for start in range(0, rows, micro):
        mb = batch.slice_rows(start, start + micro).to(mesh.device)
        with autocast(cfg, mesh.device):
            part = model(mb, loss_reduction="sum") / max(total_targets, 1)
        if start + micro >= rows:
            arm_last_backward(model)  # data parallelism reduces gradients during this backward only
        part.backward()
        loss += part.detach()
    return step_loss(loss, mesh)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], cfg: Config, mesh: Mesh) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = local_batch(b, mesh).to(mesh.device)
        with autocast(cfg, mesh.device):
            total += float(model(b, loss_reduction="sum"))
        count += b.num_target_tokens()
    model.train()
    # Each dp rank scored its rows of the batches: the loss is the sum over all of them by their count.
    sums = comm.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=mesh.device), mesh.dp_group)
    return float(sums[0] / sums[1].clamp(min=1))


def train(cfg: Config, make_source, *, kind: str = "pretrain") -> dict:
    """Train for cfg.train.steps optimizer steps; `make_source(cfg)` builds the BatchSource.

    Returns a summary (final loss, last validation loss, run folder).
    """
    mesh = init_mesh(cfg)
    run_dir = Path(cfg.train.run_dir)
    log = mesh.is_logging_rank
    if log:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    source: BatchSource = make_source(cfg)

    model = build_model(cfg.model, cfg.train.seed, device="cpu")
    if cfg.train.init_from:
        where = Path(cfg.train.init_from)
        where = ckpt.latest_checkpoint(where) or where
        ckpt.apply_model_state(model, ckpt.load_model_state(where), where)
    model = parallelize(model.to(mesh.device), cfg, mesh)
    optimizer = build_parallel_optimizer(model, cfg, mesh)
    saver = ckpt.Checkpointer(run_dir, mesh, cfg.train.keep_checkpoints, cfg.train.async_save)

    start = 0
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not cfg.train.resume:
        raise ConfigError(f"train.run_dir: {run_dir} already holds checkpoints (newest {latest.name}); pass "
                          "--train.resume=true to continue that run, or choose another --train.run_dir")
    if cfg.train.resume:
        if latest is not None:
            meta = ckpt.load_checkpoint(latest, model, optimizer, mesh)
            source.load_state_dict(meta["data"])
            start = meta["step"]
    if log:
        n_params = sum(p.numel() for p in model.parameters())
        (run_dir / "run.json").write_text(json.dumps(
            {"kind": kind, "parameters": n_params, "world_size": mesh.world_size, "config": cfg.to_dict()},
            indent=1))

    metrics_path = run_dir / "metrics.jsonl"
    if log and start == 0:
        metrics_path.write_text("")
    if log and start > 0:
        _truncate_metrics(metrics_path, start)
    val_cache = source.val_batches(cfg.train.val_batches) if cfg.train.val_every else []
    bar = tqdm(range(start, cfg.train.steps), desc=kind, disable=not log, initial=start, total=cfg.train.steps)
    summary = {"run_dir": str(run_dir)}
    for step in bar:
        t0 = time.perf_counter()
        batch = source.next_batch()
        total_targets = batch.num_target_tokens()
        loss = forward_backward(model, local_batch(batch, mesh), cfg, mesh, total_targets)
        finalize_grads(model, mesh)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip, mesh)
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)
        elapsed = time.perf_counter() - t0
        tokens_per_s = batch.tokens.numel() / elapsed
        flops_per_token = training_flops_per_token(cfg, seq_len=batch.tokens.shape[1])["total"]
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "target_tokens": total_targets,
                  "tflops_per_s": flops_per_token * tokens_per_s / 1e12}
        if cfg.train.peak_tflops:  # model FLOPs utilisation over every device of the run
            record["mfu"] = record["tflops_per_s"] / (cfg.train.peak_tflops * mesh.world_size)
        done = step + 1
        if cfg.train.val_every and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
            record["val_loss"] = evaluate(model, val_cache, cfg, mesh)
            summary["val_loss"] = record["val_loss"]
        if log:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if done % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        summary["loss"] = loss_value
        if done == cfg.train.steps or (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0):
            saver.save(done, model, optimizer, {"config": cfg.to_dict(), "data": source.state_dict()})
    saver.wait()
    if log:
        plot_losses(metrics_path, run_dir / "loss.png", kind)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file reads like an uninterrupted run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
