"""Per-rank memory of one training step of the real engine code, without the memory and without the other ranks.

    report = dry_run(cfg, rank=17)       # fake tensors, a fake process group of the preset's whole world
    report.peak_bytes, report.categories

`dry_run` runs what `flan pretrain` runs on rank `rank` of the layout's world (dp x pp x tp processes): the
shard-first build, the layout, the optimizer, and one whole step (forward and backward through the configured
pipeline schedule and microbatches, gradient reductions, optimizer step) under torch's FakeTensorMode and the
"fake" process-group backend (torch.testing's FakeStore), as torchtitan's memory estimation does. Tensors
carry shapes, dtypes and storages but no data, collectives return at once.

`MemoryTracker` (a TorchDispatchMode) counts the bytes of every live tensor storage any operation creates and
keeps the peak, with the live storages at the peak sorted into categories afterwards: weights (parameters),
gradients (.grad of parameters), optimizer state, communication buffers (storages a collective or
point-to-point operation read or wrote), activations (made by forward, kept for backward) and temporaries
(made by backward or the optimizer step and freed within it). The same tracker measures real CPU runs (tests
compare the two).

A GPU rank's batched point-to-point operations come back as NCCL returns them, one work per batch
(`coalesced_p2p`); `gpu=False` keeps the fake backend's one work per operation, as gloo answers.

Where the step reads a number out of a tensor (the target count, the gradient norm, Adafactor's parameter
RMS) the dry run answers 1: shapes and memory do not depend on it. The Triton kernels have no fake
implementations yet, so attention and the loss take the PyTorch paths (model.attention = model.loss = "torch").
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import weakref

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine.batch import Batch
from engine.config import Config, ModelConfig, resolve_auto, with_kernels

CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "comm_buffers", "temporaries")
_COMM_NAMESPACES = ("c10d", "_c10d_functional")


class MemoryTracker(TorchDispatchMode):
    """Live bytes of every storage made while active, and a snapshot of the live storages near the peak."""

    SNAPSHOT_STEP = 5e-3
    """A new breakdown by category when the live bytes pass the last one's by this fraction (so the categories
    describe a moment within 0.5% of the peak; the peak itself is exact)."""

    def __init__(self, fake_scalars: bool = False):
        super().__init__()
        self.fake_scalars = fake_scalars
        """Answer 1 where code reads a number out of a tensor (`.item()`, `float(t)`): fake tensors hold none."""
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, "forward" | "backward" | "optimizer")
        self._refs: dict[int, weakref.ref] = {}
        self.comm: set[int] = set()
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._at_peak_bytes = 0
        self.phase = "forward"
        """What is running outside autograd's backward: "forward", or "optimizer" (set by the step hooks)."""
        self._params: list[torch.Tensor] = []
        self._optimizer = None

    def watch(self, params, optimizer=None) -> None:
        """The parameters (and optimizer) whose storages, gradients and state the categories name."""
        self._params, self._optimizer = list(params), optimizer

    def track(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        key = id(storage)
        if key not in self.live:
            phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase
            self.live[key] = (storage.nbytes(), phase)
            self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key))
            self.current += storage.nbytes()
            if self.current > self.peak:
                self.peak = self.current
                if self.current > self._at_peak_bytes * (1 + self.SNAPSHOT_STEP):
                    self.at_peak, self._at_peak_bytes = self._categories(), self.current
        return key

    def _categories(self) -> dict[str, int]:
        """The live bytes by category now (storage ids are only unique among live objects: sorted here)."""
        ids = lambda tensors: {id(t.untyped_storage()) for t in tensors}  # noqa: E731
        roles = [("weights", ids(self._params)), ("gradients", ids(p.grad for p in self._params if p.grad is not None)),
                 ("optimizer_state", ids(optimizer_tensors(self._optimizer)) if self._optimizer else set()),
                 ("comm_buffers", self.comm)]
        out = dict.fromkeys(CATEGORIES, 0)
        for key, (nbytes, phase) in self.live.items():
            role = next((name for name, keys in roles if key in keys), None)
            out[role or ("activations" if phase == "forward" else "temporaries")] += nbytes
        return out

    def _freed(self, key: int, _ref) -> None:
        nbytes, _ = self.live.pop(key)
        self._refs.pop(key, None)
        self.comm.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype is torch.bool else 1
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            # Views and in-place results reuse an input's storage (a weight made before tracking, too); meta
            # tensors (the model before its shards exist) hold no memory.
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t.untyped_storage()) not in inputs:
                self.track(t)
        if func.namespace in _COMM_NAMESPACES:
            self.comm.update(inputs)
        return out

    def __enter__(self):
        # The optimizer step's own allocations are temporaries (or state), not activations.
        self._hooks = [register_optimizer_step_pre_hook(lambda *a: self._set("optimizer")),
                       register_optimizer_step_post_hook(lambda *a: self._set("forward"))]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _set(self, phase: str) -> None:
        self.phase = phase


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (ZeRO-1's flat master slices included)."""
    inner = getattr(optimizer, "inner", optimizer)
    out = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return out + list(getattr(optimizer, "shards", []))


@dataclasses.dataclass
class MemoryReport:
    rank: int
    coordinates: dict
    """dp, pp and tp rank of `rank`."""
    peak_bytes: int
    categories: dict[str, int]
    seconds: dict[str, float]
    """Wall time of the build (meta model, layout, this rank's shards) and of the step."""


def gpu_config(cfg: Config) -> Config:
    """`cfg` as it resolves on a GPU, measured on the CPU's fake tensors with the PyTorch attention and loss."""
    out = resolve_auto(cfg, cuda_available=True)
    out.train.device = "cpu"
    out.model = with_kernels(out.model, ModelConfig(attention="torch", loss="torch"))
    return out


def world_size(cfg: Config) -> int:
    p = cfg.parallel
    return max(p.dp, 1) * p.pp * p.tp


@contextlib.contextmanager
def fake_world(rank: int, size: int):
    """This process as rank `rank` of `size` on the fake backend (collectives do nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="1")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _BatchWork:
    """One work standing for a batch of point-to-point operations, as NCCL returns a coalesced batch's."""

    def __init__(self, works):
        self.works = works

    def wait(self) -> bool:
        return all(work.wait() for work in self.works)


@contextlib.contextmanager
def coalesced_p2p():
    """dist.batch_isend_irecv answered as on a GPU: NCCL coalesces a batch into one work, which the pipeline
    runner waits for at once, while the fake backend (like gloo) answers one work per operation, whose sends
    the runner keeps until the step's end (up to 6% of a middle or last rank's peak at flan-137b's layouts)."""
    per_operation = dist.batch_isend_irecv

    def batch_isend_irecv(ops):
        return [_BatchWork(per_operation(ops))]

    dist.batch_isend_irecv = batch_isend_irecv
    try:
        yield
    finally:
        dist.batch_isend_irecv = per_operation


def step_rows(cfg: Config, dp: int) -> Batch:
    """One data-parallel rank's rows of a step: train.batch_size / dp packed rows of data.seq_len tokens, two
    segments each (the shapes are what matter)."""
    rows, seq = cfg.train.batch_size // dp, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, seq))
    segments = torch.ones(rows, seq, dtype=torch.int32)
    segments[:, seq // 2:] = 2
    return Batch(tokens=tokens, labels=tokens.clone(), segment_ids=segments)


def measure_step(cfg: Config, mesh, tracker: MemoryTracker, *, initialise: bool = False,
                 fake_mode=contextlib.nullcontext):
    """Build this rank's layout and run one training step (engine.train.train_step) under `tracker`; returns
    (layout, optimizer, build seconds, step seconds)."""
    import time

    from engine.build import build_layout, meta_model
    from engine.train import train_step

    started = time.perf_counter()
    model = meta_model(cfg)  # outside any fake mode: its parameters are replaced by this rank's shards
    with fake_mode(), tracker:
        layout = build_layout(cfg, mesh, initialise=initialise, model=model)
        built = time.perf_counter()
        optimizer = layout.build_optimizer()
        tracker.watch(layout.parameters(), optimizer)
        train_step(layout, optimizer, step_rows(cfg, mesh.dp), 0)
    return layout, optimizer, built - started, time.perf_counter() - built


def dry_run(cfg: Config, rank: int, *, gpu: bool = True) -> MemoryReport:
    """Rank `rank`'s peak memory in one training step of `cfg`'s layout, on fake tensors (any size of model);
    `gpu` False resolves the config for the CPU instead (what a real CPU run does, for comparison)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from engine.parallel import init_mesh

    cfg = gpu_config(cfg) if gpu else resolve_auto(cfg, cuda_available=False)
    with fake_world(rank, world_size(cfg)), coalesced_p2p() if gpu else contextlib.nullcontext():
        mesh = init_mesh(cfg)
        tracker = MemoryTracker(fake_scalars=True)
        layout, optimizer, build_s, step_s = measure_step(
            cfg, mesh, tracker, fake_mode=functools.partial(FakeTensorMode, allow_non_fake_inputs=True))
        categories = tracker.at_peak
        coords = {"dp": mesh.dp_rank, "pp": mesh.pp_rank, "tp": mesh.tp_rank}
    return MemoryReport(rank, coords, tracker.peak, categories, {"build": build_s, "step": step_s})
