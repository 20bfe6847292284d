"""Parallel layouts applied to the plain model; the training loop talks to parallelism only through here.

    mesh = init_mesh(cfg)                       # process groups from torchrun's environment (trivial on 1 rank)
    model = parallelize(model, cfg, mesh)       # shard a single-device model in place (tensor.py)
    batch = local_batch(global_batch, mesh)     # this rank's rows of the global batch
    finalize_grads(model, mesh)                 # after the last backward of a step
    norm = clip_grad_norm(model, max_norm, mesh)
    state = full_state_dict(model, mesh)        # the single-device layout, for checkpoints and tests
    model.load_state_dict(shard_state_dict(state, model, mesh))   # and back
"""
from engine.parallel.mesh import Mesh, init_mesh
from engine.parallel.plumbing import (clip_grad_norm, finalize_grads, full_state_dict, local_batch, parallelize,
                                      shard_state_dict)

__all__ = ["Mesh", "init_mesh", "parallelize", "local_batch", "finalize_grads", "clip_grad_norm", "full_state_dict",
           "shard_state_dict"]
