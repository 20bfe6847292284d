"""Sharded checkpoints: every rank writes what it owns as safetensors, one JSON index names every global tensor
and the region each file holds; a checkpoint loads into any layout; no pickle anywhere.

    saver = Checkpointer(run_dir, mesh, keep=2, async_save=False)   # save.py: write, commit, prune
    saver.save(step, layout, optimizer, meta)
    index = load_checkpoint(latest_checkpoint(run_dir), layout, optimizer)   # load.py: any layout
    state = load_model_state(step_dir)                               # every weight whole (one device)

One concern per file: format.py (the folder layout, one rank's part of the index, the merged index.json,
RNG states), save.py (atomic sharded saves, synchronous or in a background thread), load.py (reading regions
of global tensors and resharding weights and optimizer state into this rank's layout).
"""
from engine.checkpoint.format import (COMPLETE, FORMAT, INDEX, CheckpointError, Share, checkpoint_dir, dedup_tied,
                                      latest_checkpoint, list_checkpoints, load_meta, rng_file)
from engine.checkpoint.load import (Reader, apply_model_state, bound_state, load_checkpoint, load_model_state,
                                    load_weights)
from engine.checkpoint.save import Checkpointer, commit, save_weights, write_share

__all__ = ["COMPLETE", "FORMAT", "INDEX", "CheckpointError", "Share", "checkpoint_dir", "dedup_tied",
           "latest_checkpoint", "list_checkpoints", "load_meta", "rng_file", "Reader", "apply_model_state",
           "bound_state", "load_checkpoint", "load_model_state", "load_weights", "Checkpointer", "commit",
           "save_weights", "write_share"]
