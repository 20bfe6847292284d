"""The `flan prompt-tune` command: a soft prompt for one dataset on a frozen checkpoint (engine/prompt_tuning.py).

    flan prompt-tune configs/tiny.toml --checkpoint runs/tiny-flan --dataset rte --prompt-length 16 [--examples 32]
                     [--out DIR] [--train.steps=100 --optim.lr=0.3 ...]
    flan eval configs/tiny.toml --checkpoint runs/tiny-flan --datasets rte --prompt DIR/prompt.safetensors

The model (its shape) and tokenizer come from the checkpoint's stored config; CONFIG gives the [optim], [train],
[data] and [parallel] settings and the kernels (engine.config.KERNEL_FIELDS). Rows hold one example each: the
dataset's train split in a seeded order (its first --examples rows, 0 for all of them), each rendered with a
seeded FLAN template that asks the task itself, padded to the batch's longest row. The prompt lands in
OUT/prompt.safetensors (default <checkpoint's run>/prompts/<dataset>-p<N>-k<examples>), with its provenance in
the file's metadata, next to metrics.jsonl and run.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from engine.batch import Batch
from engine.config import Config, ConfigError, with_kernels
from flan.packing import encode_pairs, rows_to_batch


class ExampleRows:
    """Global batches of one example per row from one dataset's split (engine.data_source.BatchSource)."""

    def __init__(self, cfg: Config, tokenizer, spec, *, examples: int, prompt_length: int, split: str = "train"):
        from engine.paths import shared_data_dir
        from flan.loaders import load_split
        from flan.templates import load_templates, render_template

        rows = load_split(spec, split, data_dir=shared_data_dir(cfg.data.data_dir or None),
                          bad_rows=cfg.data.bad_rows, seed=cfg.train.seed).rows
        if not rows:
            raise ConfigError(f"--dataset {spec.name}: its {split} split has no rows here")
        rng = np.random.default_rng([cfg.train.seed, 1])
        order = rng.permutation(len(rows))[:examples or None]
        templates = [t for t in load_templates(spec) if not t.turned_around]
        picks = rng.integers(0, len(templates), size=len(order))
        rendered = [render_template(spec, templates[k], rows[i]) for i, k in zip(order.tolist(), picks.tolist())]
        self.segments = encode_pairs(tokenizer, [r.prompt for r in rendered], [r.target for r in rendered],
                                     input_len=cfg.data.input_len, target_len=cfg.data.target_len)
        self.batch_size, self.pad_id, self.seed = cfg.train.batch_size, tokenizer.pad_id, cfg.train.seed
        # Sequence parallelism splits the lengthened rows (prompt + example) evenly over tp.
        self.multiple = cfg.parallel.tp if cfg.parallel.sp else 1
        self.prompt_length = prompt_length
        self.epoch, self.index = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, self.epoch]).permutation(len(self.segments))

    def next_batch(self) -> Batch:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order()
            take = order[self.index:self.index + self.batch_size - len(picked)]
            picked += [self.segments[i] for i in take.tolist()]
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        width = max(s.length for s in picked)
        width += -(width + self.prompt_length) % self.multiple
        return rows_to_batch([[s] for s in picked], width, self.pad_id)

    def val_batches(self, n: int) -> list[Batch]:
        return []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def default_out(step_dir: Path, dataset: str, prompt_length: int, examples: int) -> Path:
    """<run>/prompts/<dataset>-p<N>-k<examples> beside the checkpoint's run folder (k0: the whole split)."""
    return step_dir.parent.parent / "prompts" / f"{dataset}-p{prompt_length}-k{examples}"


def cmd_prompt_tune(args) -> int:
    from engine.checkpoint import load_meta
    from engine.config import config_from_dict, load_config
    from engine.data_source import RankSlice
    from engine.prompt_tuning import tune_prompt
    from engine.tokenizer import load_tokenizer
    from flan.eval_cli import resolve_checkpoint
    from flan.registry import load_registry

    if args.prompt_length < 1:
        raise ConfigError(f"--prompt-length {args.prompt_length}: nothing to train; use 1 or more vectors")
    if args.examples < 0:
        raise ConfigError(f"--examples {args.examples}: use 0 (the whole split) or a positive count")
    cfg = load_config(args.config, args.overrides)
    step = resolve_checkpoint(args.checkpoint, "--checkpoint")
    stored = config_from_dict(load_meta(step)["config"], f"{step} (its stored config)")
    # The checkpoint fixes the model's shape; CONFIG still picks the kernels.
    cfg.model = with_kernels(stored.model, cfg.model)
    spec = load_registry().get(args.dataset)
    tokenizer = load_tokenizer(stored)
    out = Path(args.out) if args.out else default_out(step, spec.name, args.prompt_length, args.examples)
    provenance = {"dataset": spec.name, "examples": args.examples, "split": "train"}
    summary = tune_prompt(
        cfg, step, lambda c, rank, size: RankSlice(ExampleRows(c, tokenizer, spec, examples=args.examples,
                                                               prompt_length=args.prompt_length), rank, size),
        args.prompt_length, out, provenance)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def add_prompt_tune_commands(subparsers) -> None:
    """Register `flan prompt-tune` on the `flan` parser's subparsers."""
    p = subparsers.add_parser("prompt-tune", help="train a soft prompt for one dataset on a frozen checkpoint")
    p.add_argument("config", help="TOML config whose [optim], [train], [data], [parallel] apply (configs/tiny.toml)")
    p.add_argument("--checkpoint", required=True, help="run folder (newest checkpoint) or step-NNNNNN folder")
    p.add_argument("--dataset", required=True, help="registry dataset whose train split trains the prompt, e.g. rte")
    p.add_argument("--prompt-length", type=int, required=True, help="number of prompt vectors N")
    p.add_argument("--examples", type=int, default=0, help="train examples to use (0: the whole split)")
    p.add_argument("--out", help="output folder (default: <checkpoint's run>/prompts/<dataset>-p<N>-k<examples>)")
    p.set_defaults(func=cmd_prompt_tune)
