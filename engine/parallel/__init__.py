"""Parallel layouts applied to the plain model; the training loop, the checkpointer and the scorer talk to
parallelism only through the Layout (engine/parallel/layout.py, whose docstring holds the usage).

    mesh = init_mesh(cfg)                     # process groups from torchrun's environment (trivial on 1 rank)
    layout = parallelize(model, cfg, mesh)    # tensor.py, then pipeline.py, then data.py
"""
from engine.parallel.layout import Layout, parallelize
from engine.parallel.mesh import Mesh, init_mesh

__all__ = ["Mesh", "init_mesh", "Layout", "parallelize"]
