"""Prompt tuning (Lester et al. 2021): N trainable embedding vectors before every input, the model frozen.

    prompt = SoftPrompt(sampled_vocab_init(model.tok_embeddings.weight, n=16, seed=0))
    model.requires_grad_(False)                          # before parallelize: no gradient buckets, no state
    layout = parallelize(model, cfg, mesh)
    handle = attach_to_layout(layout, prompt)            # every forward of layout.model now sees the prompt
    record = prompt_step(layout, prompt, optimizer, rows, step)   # optimizer = build_optimizer(prompt, cfg)
    save_prompt(path, prompt, provenance); prompt, provenance = load_prompt(path)
    handle.remove()

How the prompt enters the model. `attach` hooks the Transformer's forward (no change to engine/model.py, and
the Layout, the scorer and the loop run unchanged): before the forward, the batch gets N slots in front of each
row's first non-padding token (token id 0, no label, that token's segment id; positions 0..N-1, and the first
example's positions move up by N) and the embedding of the lengthened tokens, with the prompt's vectors written
into the slots, is passed in as `hidden`. After the forward, per-position outputs (logits, hidden states) lose
the slots again, so callers index the positions of their own batch; a loss needs nothing (slots carry no
label). With a KV cache only the first call (empty cache) is lengthened: the prompt's keys then sit in the
cache and continuations attend to them at the right positions (cache_positions counts them). A packed row's
first example only gets the prompt: prompt tuning feeds one example per row.

Parallel layouts. The prompt is replicated (every rank builds it from the same seeded init and steps it
with the same reduced gradient). Under tensor parallelism without sequence parallelism each rank's prompt
gradient is already whole (the residual stream is replicated and the region entries all-reduce their input
gradients); with sequence parallelism each rank embeds, so differentiates, only its sequence chunk, and the
gradient is summed over tp. Over data parallelism it is summed like any gradient (each micro-batch's loss
is already divided by the global target count). Pipeline parallelism is refused: the first stage would own
the prompt and the others would need its slot map.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from engine.batch import IGNORE_INDEX, Batch
from engine.checkpoint import apply_model_state, load_model_state
from engine.config import ConfigError, resolve_auto
from engine.model import build_model
from engine.optim import build_optimizer, lr_at, set_lr
from engine.parallel import comm, init_mesh, parallelize
from engine.run_log import MetricsLogger, run_record, write_run_record

PROMPT_TENSOR = "prompt"
PROVENANCE_KEY = "provenance"


class SoftPrompt(nn.Module):
    """The prompt's N x d_model vectors, kept in fp32 like master weights."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())

    @property
    def length(self) -> int:
        return self.weight.shape[0]


def sampled_vocab_init(embedding: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """N rows of the (whole, single-device) embedding table at seeded random ids: Lester et al.'s sampled-vocab
    init, which starts the prompt among the vectors the model knows."""
    if n < 0:
        raise ValueError(f"--prompt-length {n}: use 0 or more prompt vectors")
    ids = torch.randint(0, embedding.shape[0], (n,), generator=torch.Generator().manual_seed(seed))
    return embedding.detach()[ids].float()


@dataclass
class Slots:
    """Where the prompt sits in a lengthened batch: `index` (B, S+N) is 0..N-1 at the slots, -1 elsewhere."""

    index: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.index >= 0


def insert_slots(batch: Batch, n: int) -> tuple[Batch, Slots]:
    """The batch with n prompt slots before each row's first non-padding token (see the module docstring)."""
    B, S = batch.tokens.shape
    device = batch.tokens.device
    real = batch.segment_ids != 0
    first = torch.where(real.any(1), real.int().argmax(1), torch.zeros(B, dtype=torch.long, device=device))
    pos = torch.arange(S + n, device=device).expand(B, S + n)
    rel = pos - first[:, None]
    is_slot = (rel >= 0) & (rel < n)
    src = torch.where(pos < first[:, None], pos, pos - n).clamp(0, max(S - 1, 0))

    def take(t: torch.Tensor, fill) -> torch.Tensor:
        return t.gather(1, src.to(torch.long)).masked_fill(is_slot, fill)

    first_segment = batch.segment_ids.gather(1, first[:, None])
    segments = torch.where(is_slot, first_segment.expand(B, S + n), take(batch.segment_ids, 0))
    shifted = (~is_slot) & (rel >= n) & (segments == first_segment) & (segments != 0)
    positions = torch.where(is_slot, rel, take(batch.positions, 0) + n * shifted).to(batch.positions.dtype)
    labels = None if batch.labels is None else take(batch.labels, IGNORE_INDEX)
    lengthened = Batch(tokens=take(batch.tokens, 0), labels=labels, segment_ids=segments, positions=positions)
    return lengthened, Slots(torch.where(is_slot, rel, torch.full_like(rel, -1)))


class PromptHooks:
    """The forward hooks that put `prompt` into every forward of `model`; remove() takes them off."""

    def __init__(self, model: nn.Module, prompt: SoftPrompt, *, tp_rank: int = 0, tp: int = 1,
                 sequence_parallel: bool = False):
        if prompt.weight.shape[1] != model.cfg.d_model:
            raise ValueError(f"prompt width {prompt.weight.shape[1]} does not match the model's d_model "
                             f"{model.cfg.d_model}; use a prompt tuned on this checkpoint")
        self.model, self.prompt = model, prompt
        self.tp_rank, self.tp, self.sequence_parallel = tp_rank, tp, sequence_parallel and tp > 1
        self._pending: Slots | None = None  # set before a lengthened forward, taken after it
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, with_kwargs=True)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _before(self, module, args, kwargs):
        n = self.prompt.length
        cache = kwargs.get("cache")
        if n == 0 or (cache is not None and cache.length > 0):
            return None  # nothing to add, or the prompt is already in the cache
        if kwargs.get("hidden") is not None:
            raise ValueError("prompt tuning: a forward that starts from hidden states (a pipeline stage) cannot "
                             "take the prompt; run with --parallel.pp=1")
        batch, rest = args[0], args[1:]
        lengthened, slots = insert_slots(batch, n)
        hidden = module.tok_embeddings(lengthened.tokens)  # (B, S+N, d), or this rank's chunk under sp
        index = slots.index
        if self.sequence_parallel:
            chunk = index.shape[1] // self.tp
            index = index[:, self.tp_rank * chunk:(self.tp_rank + 1) * chunk]
        rows = self.prompt.weight.to(hidden.dtype)[index.clamp(min=0)]
        hidden = torch.where((index >= 0)[..., None], rows, hidden)
        self._pending = slots
        return (lengthened, *rest), {**kwargs, "hidden": hidden}

    def _after(self, module, args, kwargs, output):
        slots, self._pending = self._pending, None
        if slots is None:
            return None
        keep = ~slots.mask
        if output.dim() < 3:
            return None  # a loss: the slots carry no label
        B = output.shape[0]
        return output[keep].view(B, -1, *output.shape[2:])


def attach(model: nn.Module, prompt: SoftPrompt) -> PromptHooks:
    """The prompt on a single-device model (flan eval --prompt)."""
    return PromptHooks(model, prompt)


def refuse_pipeline(pp: int) -> None:
    """A soft prompt runs with pp=1: it lives on the first stage, which the hooks cannot reach from the others."""
    if pp > 1:
        raise ConfigError("--parallel.pp: a soft prompt runs with pp=1 (the prompt lives on the first stage); "
                          "use --parallel.tp or data parallelism")


def attach_to_layout(layout, prompt: SoftPrompt) -> PromptHooks:
    """The prompt on this rank's part of a layout (tensor and data parallelism; not pipeline stages)."""
    refuse_pipeline(layout.cfg.parallel.pp)
    mesh = layout.mesh
    return PromptHooks(layout.model, prompt, tp_rank=mesh.tp_rank, tp=mesh.tp,
                       sequence_parallel=layout.cfg.parallel.sp)


def reduce_prompt_gradient(layout, prompt: SoftPrompt) -> None:
    """Make every rank's prompt gradient the whole one (see the module docstring)."""
    grad = prompt.weight.grad
    if grad is None:
        return
    if layout.cfg.parallel.sp:
        comm.all_reduce(grad, layout.mesh.tp_group)
    layout.data_parallel_sum(grad)


def prompt_step(layout, prompt: SoftPrompt, optimizer, rows: Batch, step: int, total_steps: int) -> dict:
    """One optimizer step of the prompt alone (the model's weights get no gradient and no optimizer state)."""
    cfg = layout.cfg
    optimizer.zero_grad(set_to_none=True)
    total = layout.global_target_count(rows)
    loss = layout.forward_backward(rows, total)
    reduce_prompt_gradient(layout, prompt)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_([prompt.weight], max_norm))
    lr = lr_at(step, cfg.optim, total_steps)
    set_lr(optimizer, lr)
    optimizer.step()
    return {"loss": float(loss), "lr": lr, "grad_norm": grad_norm, "target_tokens": total}


def save_prompt(path, prompt: SoftPrompt, provenance: dict) -> None:
    """The prompt alone as safetensors; `provenance` (JSON) in the file's metadata."""
    from safetensors.torch import save_file

    save_file({PROMPT_TENSOR: prompt.weight.detach().cpu().contiguous()}, str(path),
              metadata={PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)})


def load_prompt(path) -> tuple[SoftPrompt, dict]:
    """A prompt saved by save_prompt and its provenance."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if PROMPT_TENSOR not in f.keys():
            raise ValueError(f"{path}: no {PROMPT_TENSOR!r} tensor; pass a file written by `flan prompt-tune`")
        meta = f.metadata() or {}
        weight = f.get_tensor(PROMPT_TENSOR)
    return SoftPrompt(weight), json.loads(meta.get(PROVENANCE_KEY, "{}"))


PROMPT_FILE = "prompt.safetensors"


def tune_prompt(cfg, step_dir, make_source, prompt_length: int, out_dir, provenance: dict) -> dict:
    """Prompt-tune the checkpoint in `step_dir` for cfg.train.steps steps into out_dir/prompt.safetensors (every
    rank; collective). `cfg.model` must be the checkpoint's model; `make_source(cfg, dp_rank, dp_size)` yields
    this rank's rows, one example per row. Writes out_dir/metrics.jsonl and run.json (kind "prompt_tune") too.
    Returns the first and last loss and the prompt's path."""
    out_dir, step_dir = Path(out_dir), Path(step_dir)
    if (out_dir / PROMPT_FILE).exists():
        raise ConfigError(f"--out {out_dir}: already holds {PROMPT_FILE}; choose another folder (it is not "
                          "overwritten)")
    resolved = resolve_auto(cfg)
    refuse_pipeline(resolved.parallel.pp)
    mesh = init_mesh(resolved)
    torch.manual_seed(cfg.train.seed)
    model = build_model(resolved.model, cfg.train.seed, device="cpu")
    apply_model_state(model, load_model_state(step_dir), step_dir)
    # Initialised from the whole embedding, before tensor parallelism slices it: the same prompt on every rank.
    prompt = SoftPrompt(sampled_vocab_init(model.tok_embeddings.weight, prompt_length, cfg.train.seed))
    model.requires_grad_(False)  # before parallelize: data parallelism then builds no gradient buckets
    layout = parallelize(model.to(mesh.device), resolved, mesh)
    prompt.to(mesh.device)
    hooks = attach_to_layout(layout, prompt)
    optimizer = build_optimizer(prompt, resolved)
    source = make_source(resolved, mesh.dp_rank, mesh.dp)
    if mesh.is_logging_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(out_dir, run_record("prompt_tune", cfg, resolved, layout.summary(), mesh.world_size,
                                             0, str(step_dir), []))
    logger = MetricsLogger.open(out_dir, 0, tensorboard=False, enabled=mesh.is_logging_rank)
    losses = []
    try:
        for step in range(cfg.train.steps):
            record = {"step": step + 1, **prompt_step(layout, prompt, optimizer, source.next_batch(), step,
                                                       cfg.train.steps)}
            losses.append(record["loss"])
            logger.log(record)
    finally:
        logger.close()
        hooks.remove()
    path = out_dir / PROMPT_FILE
    if mesh.is_logging_rank:
        save_prompt(path, prompt, {**provenance, "checkpoint": str(step_dir), "prompt_length": prompt_length,
                                   "steps": cfg.train.steps, "first_loss": losses[0] if losses else None,
                                   "final_loss": losses[-1] if losses else None,
                                   "config_hash": json.loads((out_dir / "run.json").read_text())["config_hash"]})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return {"prompt": str(path), "first_loss": losses[0] if losses else None,
            "loss": losses[-1] if losses else None}
