"""The hooks the training loop calls, made aware of the layout: tensor, pipeline and data parallelism, alone or
composed (dp x pp x tp). On one process every hook reduces to the plain single-device step.

Order of application (torchtitan's): tensor parallelism swaps modules, pipeline parallelism deletes the ones
other stages hold, data parallelism hooks the remaining parameters' gradients.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.batch import Batch
from engine.config import Config
from engine.model import Transformer
from engine.optim import build_optimizer
from engine.parallel import comm
from engine.parallel.data import GradientSync, ZeroAdamW
from engine.parallel.mesh import Mesh
from engine.parallel.pipeline import (apply_pipeline, is_tied_copy, run_schedule, split_microbatches, stage_owner,
                                      sync_tied_embedding)
from engine.parallel.tensor import apply_tensor_parallel, partial_grad_parameters, shard_dims

log = logging.getLogger(__name__)


def parallelize(model: torch.nn.Module, cfg: Config, mesh: Mesh) -> torch.nn.Module:
    """Apply the layout to a single-device model (sliced from its weights, so every layout starts equal)."""
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh, cfg.parallel.sp)
        log.info("tensor parallel over %d ranks%s", mesh.tp, " with sequence parallelism" if cfg.parallel.sp else "")
    if mesh.pp > 1:
        model = apply_pipeline(model, cfg, mesh)
        log.info("pipeline stage %d of %d: layers %s, schedule %s, %d microbatches", mesh.pp_rank, mesh.pp,
                 [f"{r.start}-{r.stop - 1}" for r in model.pipeline.layer_ranges], cfg.parallel.schedule,
                 cfg.parallel.microbatches)
    if mesh.dp > 1:
        # Gradients that need a model-parallel sum first are reduced over dp after it (finalize_grads).
        late = partial_grad_parameters(model)
        if mesh.pp > 1 and model.pipeline.tied_weight is not None:
            late.append(model.pipeline.tied_weight)
        model.data_parallel = GradientSync(model, mesh.dp_group, bucket_mb=cfg.parallel.bucket_mb,
                                           zero=cfg.parallel.zero == 1, late=late,
                                           weight_decay=cfg.optim.weight_decay)
        log.info("data parallel over %d replicas, %d gradient buckets%s", mesh.dp,
                 len(model.data_parallel.buckets), ", ZeRO-1" if cfg.parallel.zero else "")
    return model


def build_parallel_optimizer(model: torch.nn.Module, cfg: Config, mesh: Mesh):
    """The optimizer for this layout: ZeRO-1's sharded AdamW under data parallelism with parallel.zero=1."""
    if mesh.dp > 1 and cfg.parallel.zero == 1:
        return ZeroAdamW(model.data_parallel, cfg.optim)
    return build_optimizer(model, cfg)


def arm_last_backward(model: torch.nn.Module) -> None:
    """Call before the step's last backward: data parallelism reduces gradients from its hooks only then."""
    sync = getattr(model, "data_parallel", None)
    if sync is not None:
        sync.arm()


def pipeline_forward_backward(model: torch.nn.Module, batch: Batch, cfg: Config, mesh: Mesh, total_targets: int,
                              autocast) -> torch.Tensor:
    """This rank's rows through the pipeline schedule (grad_accum times, each with parallel.microbatches
    microbatches); returns the summed loss on the last stage, zero elsewhere."""
    rows = batch.tokens.shape[0]
    accum = cfg.train.grad_accum
    if rows % accum:
        raise ValueError(f"pipeline: this rank's {rows} rows do not split into train.grad_accum={accum} parts")
    sync = getattr(model, "data_parallel", None)
    size = rows // accum
    loss = torch.zeros((), device=mesh.device)
    for start in range(0, rows, size):
        arm = None
        if sync is not None and start + size == rows:  # gradients are final in the last accumulation round
            def arm(chunk: int) -> None:
                sync.arm(model.pipeline.chunks[chunk].parameters())
        microbatches = split_microbatches(batch.slice_rows(start, start + size), cfg.parallel.microbatches)
        loss += run_schedule(model, microbatches, mesh, loss_scale=1 / max(total_targets, 1), autocast=autocast,
                             before_last_backward=arm)
    return loss


def step_loss(loss: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The global batch's loss on every rank, from each rank's share (the last stage's, summed over dp)."""
    if mesh.pp > 1:
        loss = comm.all_reduce(loss.detach().clone(), mesh.pp_group)
    return comm.all_reduce(loss.detach().clone(), mesh.dp_group)


def local_batch(batch: Batch, mesh: Mesh) -> Batch:
    """This rank's rows: tensor-parallel ranks share their data-parallel replica's contiguous block of rows."""
    if mesh.dp == 1:
        return batch
    rows = batch.tokens.shape[0]
    if rows % mesh.dp:
        raise ValueError(f"train.batch_size (or grad-accumulation micro-batch) of {rows} rows does not divide "
                         f"by parallel.dp={mesh.dp}; pick a batch size that dp divides")
    share = rows // mesh.dp
    return batch.slice_rows(mesh.dp_rank * share, (mesh.dp_rank + 1) * share)


def finalize_grads(model: torch.nn.Module, mesh: Mesh) -> None:
    """After the step's last backward: finish the data-parallel bucket reductions, sum the partial gradients
    of sequence-parallel norms over tp and the tied embedding's over the first and last stage, then reduce
    those over dp too."""
    sync = getattr(model, "data_parallel", None)
    if sync is not None:
        sync.wait()
    grads = [p.grad for p in partial_grad_parameters(model) if p.grad is not None]
    if grads and comm.group_size(mesh.tp_group) > 1:
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), mesh.tp_group)  # one call for all norms
        for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(summed.view_as(g))
    sync_tied_embedding(model)
    if sync is not None:
        sync.reduce_late()


def clip_grad_norm(model: torch.nn.Module, max_norm: float, mesh: Mesh) -> float:
    """The global gradient norm over every shard, then (max_norm > 0) scale the gradients to at most max_norm.

    Each element counts once: tensor-sharded parameters on every tp rank (each holds a different part),
    replicated ones on tp rank 0; pipeline stages hold different layers, and the tied embedding counts on the
    first stage only; dp replicas hold the same reduced gradient, except under ZeRO-1 where each rank holds
    its slice. The squares are summed over the model-parallel group (and over dp with ZeRO-1).
    """
    dims = shard_dims(model)
    sharded = {id(p) for name, p in model.named_parameters() if name in dims}
    counted = {id(p) for p in model.parameters()
               if (id(p) in sharded or mesh.tp_rank == 0) and not is_tied_copy(model, p, mesh.pp_rank)}
    sync = getattr(model, "data_parallel", None)
    if sync is not None and sync.zero:
        grads = sync.shard_grads()
        square = comm.all_reduce(sync.shard_square_sum(counted), mesh.dp_group)
    else:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        square = torch.zeros((), device=mesh.device, dtype=torch.float32)
        for p in model.parameters():
            if p.grad is not None and id(p) in counted:
                square += p.grad.detach().float().pow(2).sum()
    norm = comm.all_reduce(square, mesh.mp_group).sqrt()
    if max_norm > 0:
        # The same rule as torch.nn.utils.clip_grad_norm_: never scale up; 1e-6 guards a zero norm.
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(norm)


def full_state_dict(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """The single-device names and shapes (collective: all ranks): sharded tensors all-gathered over tp, then
    every tensor broadcast over pp from the stage that holds it. Tied embeddings come back as one tensor
    under both names, as in the single-device state dict (checkpoints store it once)."""
    dims = shard_dims(model)
    local = {name: comm.all_gather(t.detach(), mesh.tp_group, dims[name]) if name in dims else t.detach()
             for name, t in model.state_dict().items()}
    full = local
    if mesh.pp > 1:
        with torch.device("meta"):
            layout = Transformer(model.cfg).state_dict()
        full = {}
        for name, meta in layout.items():
            if name == "output.weight" and model.cfg.tie_embeddings:
                continue  # aliased below
            owner = stage_owner(name, model.pipeline)
            tensor = (local[name] if owner == mesh.pp_rank else
                      torch.empty(meta.shape, dtype=meta.dtype, device=mesh.device))
            dist.broadcast(tensor, group=mesh.pp_group, group_src=owner)
            full[name] = tensor
    if model.cfg.tie_embeddings:
        full["output.weight"] = full["tok_embeddings.weight"]
    return full


def shard_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """This rank's slices of a single-device state dict (its stage's tensors, tp-sliced), for
    model.load_state_dict on the parallel model."""
    dims = shard_dims(model)
    mine = model.state_dict().keys()
    return {name: comm.local_chunk(t, mesh.tp_group, dims[name]) if name in dims else t
            for name, t in state.items() if name in mine}
