"""One training loop for pretraining and instruction tuning.

    flan pretrain configs/tiny.toml
    torchrun --nproc-per-node=2 -m flan pretrain configs/tiny.toml --parallel.tp=2

`train()` is setup (resolve the config, mesh, model, layout, optimizer, checkpointer, resume, run.json) and a
loop of `train_step`, the one function that performs an optimizer step (the parallel tests' reference calls
it too). Every step's loss is the sum over the global batch's target tokens divided by their count, whatever
the layout: each micro-batch contributes its summed loss over that global count, so gradient accumulation and
every parallel layout reproduce the single-device step. Writes <run_dir>/metrics.jsonl (one object per
optimizer step, and `val_loss` lines), TensorBoard events (train.tensorboard), <run_dir>/run.json,
checkpoints, and <run_dir>/loss.png at the end.

One step, hop by hop (docs/architecture.md draws the same):
    run_loop -> source.next_batch()                      this data-parallel rank's rows (engine/data_source.py)
             -> train_step(layout, optimizer, rows, step)
                  -> Layout.global_target_count(rows)       one all-reduce over dp
                  -> Layout.forward_backward(rows, total)   micro-batches, or pipeline.run_schedule per round;
                                                            GradientSync's hooks launch bucket reductions
                  -> Layout.finish_gradients()              wait for buckets, tp / tied-embedding sums
                  -> Layout.clip_gradients(grad_clip)       global norm over every shard
                  -> lr_at, set_lr, optimizer.step()        (ZeroAdamW: step the slice, all-gather)
             -> validation_loss(layout, batches)          Layout.summed_loss, summed over dp
             -> MetricsLogger.log(record), Checkpointer.save(step, layout, optimizer, meta)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.batch import Batch
from engine.build import build_layout as shard_first_layout
from engine.config import Config, resolve_auto
from engine.data_source import BatchSource
from engine.info import training_flops_per_token
from engine.optim import lr_at, set_lr
from engine.parallel import Layout, Mesh, init_mesh
from engine.resume import preflight, resume
from engine.run_log import MetricsLogger, plot_losses, run_record, write_run_record

MakeSource = Callable[[Config, int, int], BatchSource]
"""make_source(cfg, dp_rank, dp_size): the stream of this data-parallel rank's rows (engine/data_source.py)."""


def train_step(layout: Layout, optimizer, rows: Batch, step: int) -> dict:
    """One optimizer step (0-based `step`) on this data-parallel rank's rows of the global batch. The
    gradients of the step stay in place (clipped) until the next step clears them."""
    cfg = layout.cfg
    optimizer.zero_grad(set_to_none=True)
    total = layout.global_target_count(rows)
    loss = layout.forward_backward(rows, total)
    layout.finish_gradients()
    grad_norm = layout.clip_gradients(cfg.optim.grad_clip)
    lr = lr_at(step, cfg.optim, cfg.train.steps)
    set_lr(optimizer, lr)
    optimizer.step()
    return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm, "target_tokens": total}


@torch.no_grad()
def validation_loss(layout: Layout, batches: list[Batch]) -> float:
    """Mean token loss over validation batches; each dp rank scores its rows, summed over the replicas."""
    total, count = 0.0, 0
    for rows in batches:
        total += float(layout.summed_loss(rows))
        count += rows.num_target_tokens()
    sums = layout.data_parallel_sum(torch.tensor([total, count], dtype=torch.float64, device=layout.mesh.device))
    return float(sums[0] / sums[1].clamp(min=1))


def row_length(cfg: Config, kind: str) -> int:
    """Tokens per row: the corpus's data.seq_len, the tuning mixture's data.input_len + data.target_len."""
    return cfg.data.seq_len if kind == "pretrain" else cfg.data.input_len + cfg.data.target_len


@dataclass
class Run:
    """A training run after setup: what the loop reads and updates."""

    cfg: Config
    """As written (checkpoints and run.json store it); `layout.cfg` is the resolved copy."""
    kind: str
    run_dir: Path
    layout: Layout
    optimizer: object
    source: BatchSource
    saver: ckpt.Checkpointer
    logger: MetricsLogger
    start: int
    flops_per_token: float

    @property
    def mesh(self) -> Mesh:
        return self.layout.mesh


def train(cfg: Config, make_source: MakeSource, *, kind: str = "pretrain", heldout_clusters=()) -> dict:
    """Train for cfg.train.steps optimizer steps; `make_source(cfg, dp_rank, dp_size)` builds this rank's
    BatchSource. `heldout_clusters` (tuning) goes into run.json. Returns a summary (final loss, last
    validation loss, run folder)."""
    preflight(cfg, kind)  # every check that needs no model, before any work (engine/resume.py)
    run = setup(cfg, make_source, kind, list(heldout_clusters))
    try:
        summary = run_loop(run)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # a peer that died in the last save stops this rank here, not in wait()
        run.saver.wait()
    except BaseException:
        run.saver.abort()  # a failing rank never waits on its background save
        raise
    finally:
        run.logger.close()
    if run.mesh.is_logging_rank:
        plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png", kind)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def setup(cfg: Config, make_source: MakeSource, kind: str, heldout_clusters: list[str]) -> Run:
    """Resolve, build, lay out, resume and record the run (every rank; collective)."""
    resolved = resolve_auto(cfg)
    mesh = init_mesh(resolved)
    run_dir = Path(cfg.train.run_dir)
    if mesh.is_logging_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    source = make_source(resolved, mesh.dp_rank, mesh.dp)
    layout, init_from = build_layout(resolved, mesh)
    optimizer = layout.build_optimizer()
    saver = ckpt.Checkpointer(run_dir, mesh, cfg.train.keep_checkpoints, cfg.train.async_save)
    start = resume(run_dir, cfg, kind, layout, optimizer, source)
    tokens_per_step = cfg.train.batch_size * row_length(cfg, kind)
    if mesh.is_logging_rank:
        write_run_record(run_dir, run_record(kind, cfg, resolved, layout.summary(), mesh.world_size,
                                             tokens_per_step, init_from, heldout_clusters))
    logger = MetricsLogger.open(run_dir, start, tensorboard=cfg.train.tensorboard, enabled=mesh.is_logging_rank)
    flops = training_flops_per_token(cfg, seq_len=row_length(cfg, kind))["total"]
    return Run(cfg, kind, run_dir, layout, optimizer, source, saver, logger, start, flops)


def build_layout(cfg: Config, mesh: Mesh) -> tuple[Layout, str | None]:
    """This rank's shards of the seeded model, built shard-first (engine/build.py), or of train.init_from's
    weights (only this rank's slices read); and the step folder its weights came from."""
    if not cfg.train.init_from:
        return shard_first_layout(cfg, mesh), None
    where = Path(cfg.train.init_from)
    where = ckpt.latest_checkpoint(where) or where
    layout = shard_first_layout(cfg, mesh, initialise=False)
    ckpt.load_weights(where, layout)
    return layout, str(where)


def run_loop(run: Run) -> dict:
    """Steps run.start .. train.steps: train, log, validate and checkpoint on schedule."""
    t, mesh = run.cfg.train, run.mesh
    val_cache = run.source.val_batches(t.val_batches) if t.val_every else []
    bar = tqdm(range(run.start, t.steps), desc=run.kind, disable=not mesh.is_logging_rank, initial=run.start,
               total=t.steps)
    summary = {"run_dir": str(run.run_dir)}
    for step in bar:
        started = time.perf_counter()
        rows = run.source.next_batch()
        record = {"step": step + 1, **train_step(run.layout, run.optimizer, rows, step)}
        record.update(throughput(run, rows.tokens.numel() * mesh.dp, time.perf_counter() - started))
        done = step + 1
        if t.val_every and (done % t.val_every == 0 or done == t.steps):
            record["val_loss"] = summary["val_loss"] = validation_loss(run.layout, val_cache)
        run.logger.log(record)
        if done % t.log_every == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        summary["loss"] = record["loss"]
        if done == t.steps or (t.ckpt_every and done % t.ckpt_every == 0):
            run.saver.save(done, run.layout, run.optimizer, {"config": run.cfg.to_dict(),
                                                            "data": run.source.state_dict()})
    return summary


def throughput(run: Run, tokens: int, seconds: float) -> dict:
    """Tokens per second of the whole run, its model TFLOP/s and (given train.peak_tflops) MFU over every
    device."""
    tokens_per_s = tokens / seconds
    out = {"tokens_per_s": tokens_per_s, "tflops_per_s": run.flops_per_token * tokens_per_s / 1e12}
    if run.cfg.train.peak_tflops:
        out["mfu"] = out["tflops_per_s"] / (run.cfg.train.peak_tflops * run.mesh.world_size)
    return out
