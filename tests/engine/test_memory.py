"""`flan memory`'s dry run against reality: on fake tensors and a fake process group it reports the peak and
the categories a real CPU run of the same step allocates (one device, and rank 0 of a real tp=2 x sp gloo
pair), and its --json carries rank, peak_bytes, planned_bytes and categories."""
from __future__ import annotations

import json

from engine.config import load_config, resolve_auto
from engine.memory import MemoryTracker, dry_run, measure_step
from tests.engine.parallel.launch import launch

SMALL = ["--data.seq_len=64", "--train.batch_size=4", "--model.n_layers=2"]
TOLERANCE = 0.01


def real_cpu_step(flags: list[str]) -> dict:
    """Peak and categories of one real training step on this process's rank (gloo when launched)."""
    from engine.parallel import init_mesh

    cfg = resolve_auto(load_config("configs/tiny.toml", SMALL + flags), cuda_available=False)
    tracker = MemoryTracker()
    measure_step(cfg, init_mesh(cfg), tracker)
    return {"peak": tracker.peak, "categories": tracker.at_peak}


def assert_agree(fake, real: dict) -> None:
    assert abs(fake.peak_bytes - real["peak"]) <= TOLERANCE * real["peak"], (fake.peak_bytes, real["peak"])
    for name, want in real["categories"].items():
        assert abs(fake.categories[name] - want) <= TOLERANCE * real["peak"], (name, fake.categories, real)


def test_dry_run_agrees_with_a_real_cpu_step():
    flags = ["--optim.name=adafactor"]
    fake = dry_run(load_config("configs/tiny.toml", SMALL + flags), 0, gpu=False)
    real = real_cpu_step(flags)
    assert_agree(fake, real)
    assert fake.categories["weights"] > 0 and fake.categories["activations"] > 0


def test_dry_run_of_a_tensor_parallel_rank_agrees_with_real_gloo_ranks():
    flags = ["--parallel.tp=2", "--parallel.sp=true"]
    real = launch(real_cpu_step, 2, flags)
    for rank in (0, 1):
        assert_agree(dry_run(load_config("configs/tiny.toml", SMALL + flags), rank, gpu=False), real[rank])


def test_memory_json(capsys):
    from flan.cli import main

    assert main(["memory", "configs/tiny.toml", "--rank", "1", "--json", "--parallel.pp=2",
                 "--parallel.microbatches=2", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rank"] == 1 and out["pp_rank"] == 1
    assert out["peak_bytes"] >= sum(out["categories"].values()) * (1 - TOLERANCE) > 0
    assert 0 < out["planned_bytes"]


def test_gpu_dry_runs_answer_a_point_to_point_batch_with_one_work_as_nccl_does():
    """The pipeline runner waits at once for a batch that comes back as one work (NCCL) and keeps per-operation
    sends (gloo, the fake backend) until the step's end; GPU dry runs get NCCL's answer, and only inside."""
    import torch
    import torch.distributed as dist

    from engine.memory import coalesced_p2p, fake_world

    with fake_world(0, 2):
        ops = [dist.P2POp(dist.isend, torch.ones(3), 1), dist.P2POp(dist.irecv, torch.empty(3), 1)]
        assert len(dist.batch_isend_irecv(ops)) == 2
        with coalesced_p2p():
            works = dist.batch_isend_irecv(ops)
            assert len(works) == 1 and works[0].wait()
        assert len(dist.batch_isend_irecv(ops)) == 2
