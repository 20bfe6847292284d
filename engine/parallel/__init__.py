"""Parallel layouts applied to the plain model; the training loop talks to parallelism only through here.

    mesh = init_mesh(cfg)                       # process groups from torchrun's environment (trivial on 1 rank)
    model = parallelize(model, cfg, mesh)       # tensor.py, then pipeline.py, then data.py
    optimizer = build_parallel_optimizer(model, cfg, mesh)   # ZeRO-1 under dp with parallel.zero=1
    batch = local_batch(global_batch, mesh)     # this rank's rows of the global batch
    loss = pipeline_forward_backward(model, batch, cfg, mesh, total_targets, autocast)   # pp > 1
    arm_last_backward(model)                    # otherwise: before the step's last backward
    loss = step_loss(loss, mesh)                # the global step loss on every rank
    finalize_grads(model, mesh)                 # after the last backward of a step
    norm = clip_grad_norm(model, max_norm, mesh)
    state = full_state_dict(model, mesh)        # the single-device layout, for checkpoints and tests
    model.load_state_dict(shard_state_dict(state, model, mesh))   # and back
"""
from engine.parallel.mesh import Mesh, init_mesh
from engine.parallel.plumbing import (arm_last_backward, build_parallel_optimizer, clip_grad_norm, finalize_grads,
                                      full_state_dict, local_batch, parallelize, pipeline_forward_backward,
                                      shard_state_dict, step_loss)

__all__ = ["Mesh", "init_mesh", "parallelize", "build_parallel_optimizer", "local_batch", "pipeline_forward_backward",
           "arm_last_backward", "step_loss", "finalize_grads", "clip_grad_norm", "full_state_dict", "shard_state_dict"]
