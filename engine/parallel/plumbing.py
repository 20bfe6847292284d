"""The hooks the training loop calls, made aware of the layout (tensor parallelism now; pipeline and data
parallelism extend them). On one process every hook reduces to the plain single-device step."""
from __future__ import annotations

import logging

import torch

from engine.batch import Batch
from engine.config import Config
from engine.parallel import comm
from engine.parallel.mesh import Mesh
from engine.parallel.tensor import apply_tensor_parallel, partial_grad_parameters, shard_dims

log = logging.getLogger(__name__)


def parallelize(model: torch.nn.Module, cfg: Config, mesh: Mesh) -> torch.nn.Module:
    """Apply the layout to a single-device model (sliced from its weights, so every layout starts equal)."""
    for degree, flag in ((mesh.pp, "pp"), (mesh.dp, "dp")):
        if degree > 1:
            raise NotImplementedError(f"parallel.{flag}={degree}: only tensor parallelism is implemented so far; "
                                      f"launch tp x pp = {mesh.tp * mesh.pp} processes for --parallel.tp={mesh.tp}")
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh, cfg.parallel.sp)
        log.info("tensor parallel over %d ranks%s", mesh.tp, " with sequence parallelism" if cfg.parallel.sp else "")
    return model


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
    """After the step's last backward: sum the partial gradients of sequence-parallel norms over tp."""
    grads = [p.grad for p in partial_grad_parameters(model) if p.grad is not None]
    if not grads or comm.group_size(mesh.tp_group) == 1:
        return
    flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), mesh.tp_group)  # one call for all norms
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def clip_grad_norm(model: torch.nn.Module, max_norm: float, mesh: Mesh) -> float:
    """The global gradient norm over every shard, then (max_norm > 0) scale the gradients to at most max_norm.

    Sharded parameters count on every tensor-parallel rank (each holds a different part); replicated ones only
    on tp rank 0, so that the sum over the model-parallel group counts each element once.
    """
    dims = shard_dims(model)
    sharded = {id(p) for name, p in model.named_parameters() if name in dims}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    counted = [p.grad for p in model.parameters()
               if p.grad is not None and (id(p) in sharded or mesh.tp_rank == 0)]
    device = grads[0].device if grads else mesh.device
    square = torch.zeros((), device=device, dtype=torch.float32)
    for g in counted:
        square += g.detach().float().pow(2).sum()
    norm = comm.all_reduce(square, mesh.mp_group).sqrt()
    if max_norm > 0:
        # The same rule as torch.nn.utils.clip_grad_norm_: never scale up; 1e-6 guards a zero norm.
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return float(norm)


def full_state_dict(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """The single-device names and shapes: every sharded tensor all-gathered over tp (collective: all ranks)."""
    dims = shard_dims(model)
    return {name: comm.all_gather(t.detach(), mesh.tp_group, dims[name]) if name in dims else t.detach()
            for name, t in model.state_dict().items()}


def shard_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    """This rank's slices of a single-device state dict, for model.load_state_dict on the parallel model."""
    dims = shard_dims(model)
    return {name: comm.local_chunk(t, mesh.tp_group, dims[name]) if name in dims else t
            for name, t in state.items()}
