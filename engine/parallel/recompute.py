"""Activation recomputation: parallel.recompute = "none" | "selective" | "full", applied block by block.

    apply_recompute(model, "selective")     # before tensor parallelism (engine/parallel/layout.py parallelize)

full       each block keeps only its input; backward re-runs its forward (non-reentrant torch.utils.checkpoint)
selective  each block keeps its matmul outputs and recomputes the rest in backward: the attention core
           (softmax and its mask), the norms, rotary embeddings, the activation function and the casts, the
           memory-heavy and cheap parts (Korthikanti et al. 2022; torchtitan's op-level policy), through
           torch.utils.checkpoint's selective checkpoint contexts

A block becomes a `RecomputedBlock`: a view sharing the block's modules (so names, parameters and what tensor
parallelism swaps inside stay those of the plain model) whose forward runs under the checkpoint. Forward-only
passes (no grad) and decoding with a KV cache run the block directly. Every mode gives the same losses and
gradients: recomputation replays the same operations on the same inputs.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from engine.model import Block, Transformer

MODES = ("none", "selective", "full")

# The matmuls: what selective recomputation keeps (recomputing them would cost a third more of the FLOPs).
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Collectives are kept too: recomputing one would communicate again, and tensor parallelism's in-place
    # all-reduce would sum the kept matmul output a second time.
    if op in _SAVED_OPS or op.namespace in ("c10d", "_c10d_functional"):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


class RecomputedBlock(Block):
    """A block whose forward runs under the checkpoint of its mode ("selective" or "full")."""

    mode = "full"

    def forward(self, x, rope, segment_ids, cache=None, name=""):
        if cache is not None or not torch.is_grad_enabled():
            return super().forward(x, rope, segment_ids, cache, name)
        run = functools.partial(Block.forward, self)
        if self.mode == "selective":
            return checkpoint(run, x, rope, segment_ids, use_reentrant=False, context_fn=_selective_contexts)
        return checkpoint(run, x, rope, segment_ids, use_reentrant=False)


def recomputed(block: Block, mode: str) -> RecomputedBlock:
    """A RecomputedBlock sharing `block`'s state and modules."""
    view = RecomputedBlock.__new__(RecomputedBlock)
    view.__dict__.update(block.__dict__)
    view.mode = mode
    return view


def apply_recompute(model: Transformer, mode: str) -> None:
    """Make every block of `model` recompute in backward as `mode` says (nothing for "none")."""
    if mode not in MODES:
        raise ValueError(f"parallel.recompute: {mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode == "none":
        return
    for name in list(model.layers):
        model.layers[name] = recomputed(model.layers[name], mode)
