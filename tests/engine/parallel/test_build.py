"""Shard-first build (engine/build.py): every layout's initial shards are the single-device model's initial
weights slice for slice (tp 2 and 4, pp 2 and 4, dp x pp x tp on real gloo processes), any region of the
initial values is drawn without the rest of its tensor, and building one rank's shard of a model peaks at its
shards plus one tensor of resident memory (a subprocess's VmHWM, under a fake process group)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import launch
from reference import make_config

from engine import model as model_module
from engine.model import build_model, initial_region
from engine.paths import REPO_ROOT

MODEL = dict(vocab_size=16, d_model=8, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=2, d_ff=16)


def initial_shards_worker(layouts: list[dict]) -> list[str]:
    """Build every layout shard-first; list each local parameter that differs from the single-device slice."""
    from engine.build import build_layout
    from engine.parallel import init_mesh

    failures = []
    for parallel in layouts:
        for tied in (False, True):
            cfg = make_config({**MODEL, "tie_embeddings": tied}, 8, **parallel)
            cfg.train.seed = 11
            single = dict(build_model(cfg.model, 11).named_parameters())
            layout = build_layout(cfg, init_mesh(cfg))
            specs = layout.shard_specs()
            for name, p in layout.named_parameters():
                box = specs[name].box
                want = single[specs[name].global_name][tuple(slice(a, b) for a, b in box)]
                if p.device.type == "meta" or not torch.equal(p.detach(), want):
                    failures.append(f"{parallel} tied={tied} rank {layout.mesh.rank}: {name} {box}")
    return failures


def test_every_layout_starts_from_the_single_device_slices():
    four = [dict(tp=4), dict(pp=4, schedule="1f1b", microbatches=4), dict(tp=2), dict(pp=2, schedule="1f1b",
            microbatches=2), dict(tp=2, pp=2, schedule="interleaved", virtual_stages=2, microbatches=2, sp=True)]
    eight = [dict(tp=2, pp=2, dp=2, schedule="gpipe", microbatches=2)]
    failures = [f for world, layouts in ((4, four), (8, eight))
                for rank in launch(initial_shards_worker, world, layouts, timeout=180) for f in rank]
    assert not failures, "\n".join(failures)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 5), cut=st.data())
def test_any_region_equals_the_slice_of_the_whole(rows, cols, cut):
    """Blocks of 7 elements: regions straddle generator blocks, rows larger than a block get one each."""
    r0 = cut.draw(st.integers(0, rows - 1))
    r1 = cut.draw(st.integers(r0 + 1, rows))
    c0 = cut.draw(st.integers(0, cols - 1))
    c1 = cut.draw(st.integers(c0 + 1, cols))
    cfg = make_config(MODEL, 8).model
    saved = model_module.INIT_BLOCK_ELEMENTS
    model_module.INIT_BLOCK_ELEMENTS = 7
    try:
        whole = initial_region(cfg, "layers.0.attn.wo.weight", (rows, cols), ((0, rows), (0, cols)), 3)
        part = initial_region(cfg, "layers.0.attn.wo.weight", (rows, cols), ((r0, r1), (c0, c1)), 3)
    finally:
        model_module.INIT_BLOCK_ELEMENTS = saved
    assert torch.equal(part, whole[r0:r1, c0:c1])
    assert whole.abs().sum() > 0


PEAK_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from engine.build import build_layout
from engine.config import Config, ModelConfig, ParallelConfig, resolve_auto
from engine.parallel import init_mesh

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

os.environ.update(RANK="1", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
model = ModelConfig(vocab_size=32768, d_model=1024, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=128, d_ff=4096,
                    tie_embeddings=False)
cfg = resolve_auto(Config(model=model, parallel=ParallelConfig(tp=4)).validate("test"), cuda_available=False)
mesh = init_mesh(cfg)
# Warm up on a small model first: the first calls fault in pages of torch's own code, which are not the build's.
small = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=8, n_kv_heads=8, head_dim=2, d_ff=16)
build_layout(resolve_auto(Config(model=small, parallel=ParallelConfig(tp=4)).validate("test"), cuda_available=False),
             mesh)
open("/proc/self/clear_refs", "w").write("5")  # restart the high-water mark here
before = status("VmRSS")
layout = build_layout(cfg, mesh)
with torch.device("meta"):
    from engine.model import Transformer
    full = Transformer(model)
shard = sum(p.numel() * p.element_size() for p in layout.parameters())
print(json.dumps({"grown": status("VmHWM") - before, "shard": shard,
                  "largest": max(p.numel() * 4 for p in full.parameters()),
                  "whole": sum(p.numel() * 4 for p in full.parameters())}))
"""


def test_building_one_shard_peaks_at_the_shard_plus_one_tensor():
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                           # A fixed mmap threshold: glibc otherwise raises it after the first
                                           # large free and keeps later blocks in its heap, so the RSS measured
                                           # the allocator's retention (seen: 324 vs 268 MB on a loaded CI run).
                                           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["shard"] + m["largest"] < m["whole"]  # the bound is well below building the whole model
    assert m["grown"] <= m["shard"] + m["largest"], m


def init_from_worker(saved: str, layouts: list[dict]) -> list[str]:
    """train.init_from under each layout: every local parameter equals its slice of the saved weights."""
    from engine import checkpoint as ckpt
    from engine.parallel import init_mesh
    from engine.train import build_layout

    want = ckpt.load_model_state(saved)
    failures = []
    for parallel in layouts:
        cfg = make_config({**MODEL, "tie_embeddings": True}, 8, **parallel)
        cfg.train.init_from = saved
        layout, where = build_layout(cfg, init_mesh(cfg))
        specs = layout.shard_specs()
        for name, p in layout.named_parameters():
            region = want[specs[name].global_name][tuple(slice(a, b) for a, b in specs[name].box)]
            if where != saved or not torch.equal(p.detach(), region):
                failures.append(f"{parallel} rank {layout.mesh.rank}: {name}")
    return failures


def test_init_from_under_another_layout_reads_the_saved_slices(tmp_path):
    from engine import checkpoint as ckpt
    from engine.parallel import Mesh, parallelize

    cfg = make_config({**MODEL, "tie_embeddings": True}, 8)
    layout = parallelize(build_model(cfg.model, 5), cfg, Mesh())
    with torch.no_grad():  # weights no seed gives, so that nothing but the checkpoint can produce them
        for p in layout.parameters():
            p.add_(torch.rand_like(p))
    saved = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(1, layout, None, {"config": cfg.to_dict()})
    layouts = [dict(tp=4), dict(tp=2, pp=2, schedule="1f1b", microbatches=2), dict(pp=4, schedule="gpipe",
                                                                               microbatches=4)]
    failures = [f for rank in launch(init_from_worker, 4, str(saved), layouts, timeout=180) for f in rank]
    assert not failures, "\n".join(failures)
