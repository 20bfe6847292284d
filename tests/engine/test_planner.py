"""The planner: its memory figures against what the engine really allocates (CPU, fp32), and its answers for
flan-137b on 64, 256 and 1024 GPUs of 80 GiB.

Tolerance of the reality checks: 0.1%. The planner counts every tensor autograd keeps for this engine's
forward, so the only differences are scalars it leaves out (optimizer step counters, 0-d loss pieces).
"""
import argparse
import json

import pytest
import torch

from engine import planner as P
from engine.batch import Batch
from engine.config import load_config
from engine.info import parameter_table
from engine.model import build_model
from engine.optim import build_optimizer
from engine.plan_cli import add_plan_commands, parse_bytes
from tests.engine.parallel.launch import launch

TOLERANCE = 1e-3
SMALL = ["--data.seq_len=64", "--train.batch_size=2"]


def saved_activation_bytes(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes of every distinct storage autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(batch)
    return loss, sum(seen.values())


def packed_batch(cfg, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    rows, s = cfg.train.batch_size, cfg.data.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (rows, s), generator=g)
    segments = torch.ones(rows, s, dtype=torch.int32)
    segments[:, s // 2:] = 2
    segments[0, -5:] = 0  # padding
    return Batch(tokens=tokens, labels=tokens, segment_ids=segments)


def close(measured: float, planned: float) -> bool:
    return abs(measured - planned) <= TOLERANCE * planned


@pytest.mark.parametrize("flags", [
    [],  # the tiny preset: GQA, SwiGLU, tied head, head_dim = d_model / n_heads
    ["--model.mlp=geglu", "--model.tie_embeddings=false", "--model.head_dim=48", "--model.n_kv_heads=1",
     "--optim.name=adafactor"],
])
def test_memory_matches_what_the_tiny_model_allocates_on_cpu(flags):
    cfg = load_config("configs/tiny.toml", SMALL + flags)
    model = build_model(cfg.model, 0)
    loss, activations = saved_activation_bytes(model, packed_batch(cfg))
    loss.backward()
    optimizer = build_optimizer(model, cfg)
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.ndim)

    plan = P.plan(cfg, P.Layout(dp=1, pp=1, tp=1, microbatches=1), P.H100_80G, P.FP32_CPU)
    assert weights == plan.weights_bytes and grads == plan.grads_bytes
    assert close(state, plan.optimizer_bytes), (state, plan.optimizer_bytes)
    assert close(activations, plan.activations_bytes), (activations, plan.activations_bytes)
    assert weights == 4 * sum(parameter_table(cfg).values())


def _tensor_parallel_activations(flags_by_case):
    from engine.config import resolve_auto
    from engine.parallel import init_mesh, parallelize

    out = []
    mesh = None
    for flags in flags_by_case:
        cfg = resolve_auto(load_config("configs/tiny.toml", SMALL + flags), cuda_available=False)
        mesh = mesh or init_mesh(cfg)
        layout = parallelize(build_model(cfg.model, 0), cfg, mesh)
        _, measured = saved_activation_bytes(layout.model, packed_batch(cfg))
        planned = P.Layout(dp=1, pp=1, tp=mesh.tp, microbatches=1, sp=cfg.parallel.sp)
        plan = P.plan(cfg, planned, P.H100_80G, P.FP32_CPU)
        weights = sum(p.numel() * p.element_size() for p in layout.parameters())
        out.append((measured, plan.activations_bytes, weights, plan.weights_bytes))
    return out


def test_tensor_parallel_memory_matches_two_real_ranks():
    cases = [["--parallel.tp=2"], ["--parallel.tp=2", "--parallel.sp=true"]]
    for rank_result in launch(_tensor_parallel_activations, 2, cases):
        for measured, planned, weights, planned_weights in rank_result:
            assert weights == planned_weights
            assert close(measured, planned), (measured, planned)


def test_schedule_recompute_and_zero_terms():
    cfg = load_config("configs/tiny.toml", ["--model.n_layers=8", "--train.batch_size=16"])
    hw, base = P.H100_80G, P.Layout(dp=2, pp=4, tp=1, microbatches=8, schedule="1f1b")
    one = P.plan(cfg, base, hw)
    gpipe = P.plan(cfg, P.Layout(2, 4, 1, 8, "gpipe"), hw)
    inter = P.plan(cfg, P.Layout(2, 4, 1, 8, "interleaved", virtual_stages=2), hw)
    recompute = P.plan(cfg, P.Layout(2, 4, 1, 8, "1f1b", recompute="full"), hw)
    zero = P.plan(cfg, P.Layout(2, 4, 1, 8, "1f1b", zero=1), hw)
    assert gpipe.activations_bytes > inter.activations_bytes > one.activations_bytes > recompute.activations_bytes
    assert zero.optimizer_bytes == pytest.approx(one.optimizer_bytes / 2)
    assert one.time_parts["bubble"] / (one.time_parts["compute"] + one.time_parts["tp_comm"]) == pytest.approx(3 / 8)
    assert inter.time_parts["bubble"] < one.time_parts["bubble"]
    assert recompute.time_parts["compute"] > one.time_parts["compute"]
    # 1F1B's first rank holds p microbatches of its L/p layers: the whole model's layers once.
    layer = P.layer_activation_bytes(cfg, base, 1, P.BF16_MIXED)
    edge = P.edge_activation_bytes(cfg, base, 1, P.BF16_MIXED)["first"]
    assert one.activations_bytes >= 4 * 2 * layer + 4 * edge - 1
    with pytest.raises(ValueError, match="batch_size=16 rows do not split into dp=2 x microbatches=3"):
        P.plan(cfg, P.Layout(2, 4, 1, 3, "1f1b"), hw)


@pytest.fixture(scope="module")
def flan_137b():
    return load_config("configs/flan-137b.toml")


@pytest.mark.parametrize("gpus", [64, 256, 1024])
def test_flan_137b_has_feasible_layouts_and_names_the_fastest(flan_137b, gpus):
    plans = P.enumerate_plans(flan_137b, gpus, P.H100_80G)
    fitting = [p for p in plans if p.fits]
    assert fitting, f"no layout of flan-137b fits on {gpus} GPUs"
    assert all(p.layout.dp * p.layout.pp * p.layout.tp == gpus for p in plans)
    assert [p.step_s for p in fitting] == sorted(p.step_s for p in fitting)
    best = fitting[0]
    assert best.total_bytes <= 0.9 * 80 * P.GiB and 0 < best.mfu <= P.H100_80G.efficiency
    # Every rank's share of the 137.7B parameters (plus the head's copy of the tied embedding on the last stage).
    total = sum(parameter_table(flan_137b).values())
    share = P.rank_parameters(flan_137b, best.layout, P.model_shapes(flan_137b))
    per_rank = total / (best.layout.pp * best.layout.tp)
    assert per_rank <= max(r.elements for r in share.values()) <= 1.2 * per_rank + 262144000 / best.layout.tp


def test_flan_137b_does_not_fit_on_eight_gpus(flan_137b):
    # 137.7B parameters need at least 8 bytes each (bf16 weights, bf16 grads, fp32 master): 1.1 TB > 8 x 72 GiB.
    assert not any(p.fits for p in P.enumerate_plans(flan_137b, 8, P.H100_80G))


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="flan")
    add_plan_commands(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_table_json_and_errors(capsys):
    out = run_cli(["plan", "configs/gpu-125m.toml", "--gpus", "8", "--gpu-memory", "80GiB", "--top", "3"], capsys)
    assert "candidate layouts fit" in out and "fastest: dp" in out
    data = json.loads(run_cli(["plan", "configs/gpu-125m.toml", "--gpus", "8", "--json",
                               "--train.batch_size=32"], capsys))
    assert data["tokens_per_step"] == 32 * 1024 and data["fastest"]["fits"]
    assert data["fastest"]["step_s"] == min(p["step_s"] for p in data["plans"] if p["fits"])
    assert parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("40 GB") == 40e9
    with pytest.raises(argparse.ArgumentTypeError, match="--gpu-memory '80 parsecs'"):
        parse_bytes("80 parsecs")


@pytest.mark.parametrize("flags", [[], ["--parallel.tp=2", "--parallel.sp=true"]])
def test_activation_bytes_of_each_recompute_mode_match_the_engine_on_cpu(flags):
    """What a forward leaves allocated for backward (engine/memory.py's tracker, real CPU tensors) under each
    parallel.recompute mode, against the planner's kept activations for that mode, within 10%. The tp = 2
    case runs one rank of a fake tensor-parallel world: the shapes, not the values, decide the bytes."""
    from engine.config import resolve_auto
    from engine.memory import MemoryTracker, fake_world
    from engine.parallel import init_mesh

    for mode in P.RECOMPUTE_MODES:
        cfg = resolve_auto(load_config("configs/tiny.toml", SMALL + flags + [f"--parallel.recompute={mode}"]),
                           cuda_available=False)
        with fake_world(0, cfg.parallel.tp):
            from engine.build import build_layout

            layout = build_layout(cfg, init_mesh(cfg))
            tracker = MemoryTracker()
            with tracker:
                loss = layout.model(packed_batch(cfg), loss_reduction="sum")
            measured = tracker.current - loss.untyped_storage().nbytes()
        planned = P.kept_activation_bytes(cfg, P.config_layout(cfg), cfg.train.batch_size, P.FP32_CPU, "first")
        assert abs(measured - planned) <= 0.1 * planned, (mode, measured, planned)


def _real_step_peak(flags):
    """This gloo rank's pipeline rank and the peak live bytes of one real training step (engine/memory.py)."""
    from engine.config import resolve_auto
    from engine.memory import MemoryTracker, measure_step
    from engine.parallel import init_mesh

    cfg = resolve_auto(load_config("configs/tiny.toml", SMALL + flags), cuda_available=False)
    mesh = init_mesh(cfg)
    tracker = MemoryTracker()
    measure_step(cfg, mesh, tracker)
    return mesh.pp_rank, tracker.peak


def test_whole_rank_figure_with_data_parallel_buckets_matches_real_gloo_ranks():
    """rank_bytes (everything a rank holds at its peak) against one real CPU step's peak on each of 4 gloo
    ranks (dp 2 x pp 2, 1F1B), within 10%. At this size (short rows, Adafactor's small state, a vocabulary small
    enough for an even layer split) the peak is at the end of backward, where the data-parallel buckets hold a
    flat copy of the rank's gradients beside the weights and the gradients: without that term the last
    pipeline rank is planned 17% under."""
    flags = ["--model.n_layers=4", "--model.vocab_size=512", "--optim.name=adafactor", "--train.batch_size=4",
             "--parallel.dp=2", "--parallel.pp=2", "--parallel.microbatches=2", "--parallel.schedule=1f1b"]
    from engine.config import resolve_auto

    cfg = resolve_auto(load_config("configs/tiny.toml", SMALL + flags), cuda_available=False)
    layout = P.config_layout(cfg)
    for pp_rank, peak in launch(_real_step_peak, layout.dp * layout.pp, flags):
        planned = P.rank_bytes(cfg, layout, pp_rank, P.FP32_CPU)["total"]
        assert abs(planned - peak) <= 0.1 * peak, (pp_rank, planned, peak)
