"""Shard-first build: the model on the meta device, the layout applied there, then only this rank's shards.

    layout = build_layout(cfg, mesh)                    # seeded initial values, this rank's slices only
    layout = build_layout(cfg, mesh, initialise=False)  # uninitialised shards (a checkpoint fills them)

No rank ever holds the whole model: each local parameter is created on the mesh's device at its shard's shape
and filled with its region of the single-device initial values (engine/model.py `initial_region`: drawn in row
blocks from generators seeded by (seed, tensor name)), so every layout starts from the single-device weights
and a rank's memory beyond its shards is one generator block. The new parameters replace the meta ones in
their modules; parallelize updates what it recorded about them (tied weights, sequence-parallel gains).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.config import Config
from engine.model import Transformer, initial_region
from engine.parallel.layout import Layout, parallelize
from engine.parallel.mesh import Mesh
from engine.parallel.specs import parameter_specs


def build_layout(cfg: Config, mesh: Mesh, *, initialise: bool = True, model: Transformer | None = None) -> Layout:
    """This rank's part of the seeded model (train.seed) under `cfg`'s layout; `cfg` resolved. `model`: the
    model on the meta device, when the caller made it (the memory dry run makes it outside its fake mode)."""
    if model is None:
        model = meta_model(cfg)

    def materialize(local: Transformer, dims: dict[str, int]) -> dict[int, nn.Parameter]:
        return materialize_shards(local, dims, mesh, cfg.train.seed if initialise else None)

    return parallelize(model, cfg, mesh, materialize)


def meta_model(cfg: Config) -> Transformer:
    """The whole single-device model on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return Transformer(cfg.model)


@torch.no_grad()
def materialize_shards(model: Transformer, dims: dict[str, int], mesh: Mesh, seed: int | None
                       ) -> dict[int, nn.Parameter]:
    """Replace every meta parameter of `model` by its shard on mesh.device, one tensor at a time (`dims`: what
    tensor parallelism split, as the shard specs read it); `seed` None leaves the values uninitialised. A
    parameter shared by two modules (tied embeddings) stays shared. Returns id(old parameter) -> new one."""
    specs = parameter_specs(model.named_parameters(), dims, set(), mesh)
    new: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters():  # each shared parameter once, under its first name
        if p.device.type != "meta":
            continue
        if seed is None:
            values = torch.empty(p.shape, dtype=p.dtype, device=mesh.device)
        else:
            spec = specs[name]
            values = initial_region(model.cfg, name, spec.global_shape, spec.box, seed).to(mesh.device, p.dtype)
        new[id(p)] = nn.Parameter(values, requires_grad=p.requires_grad)
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[leaf] = new[id(p)]
    return new
