"""Data parallelism (dp=2, with and without ZeRO-1) equals the single-device model through the training loop's
train_step; bucket all-reduces start during backward; ZeRO-1 holds half the optimizer state; each rank sends
2(dp-1)/dp of the gradient bytes per step (counted by engine/parallel/comm.py's one tally). One launch of 2
gloo processes runs everything."""
from __future__ import annotations

import time

import torch
from hypothesis import strategies as st
from launch import launch
from reference import compare_layout, draw_cases, make_batch, make_config, model_shapes

from engine.data_source import rank_rows
from engine.model import build_model
from engine.optim import build_optimizer
from engine.parallel import comm, init_mesh, parallelize


@st.composite
def data_parallel_case(draw, zero: int) -> dict:
    accum = draw(st.sampled_from([1, 2]))
    return dict(model=draw(model_shapes(min_layers=1)), seq_len=draw(st.integers(3, 8)),
                rows=2 * accum * draw(st.integers(1, 2)), grad_accum=accum, seed=draw(st.integers(0, 2**16)),
                parallel=dict(zero=zero, bucket_mb=draw(st.sampled_from([1e-4, 1e-3, 25.0]))))


def overlap_and_volume(zero: int) -> dict:
    """One backward of a 4-layer model in ~1 KiB buckets: how many bucket reductions had started when the
    gradient reached the embedding output (the last thing backward computes), the bytes sent per step and
    the optimizer state held."""
    model_shape = dict(vocab_size=32, d_model=16, n_layers=4, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32)
    cfg = make_config(model_shape, 8, zero=zero, bucket_mb=1 / 1024)
    mesh = init_mesh(cfg)
    layout = parallelize(build_model(cfg.model, 0), cfg, mesh)
    sync = layout.sync
    batch = rank_rows(make_batch(4, 8, 32, seed=1), mesh.dp_rank, mesh.dp)
    seen = {}

    def count_launches(grad):
        seen.setdefault("at_embedding", len(sync.launch_times))

    def watch_embedding_output(module, args, out):
        out.register_hook(count_launches)

    layout.model.tok_embeddings.register_forward_hook(watch_embedding_output)
    optimizer = layout.build_optimizer()
    with comm.count_bytes() as tally:
        layout.model(batch, loss_reduction="sum").backward()  # not armed: a non-final microbatch
        launched_unarmed = len(sync.launch_times)
        sync.arm()
        seen.pop("at_embedding")
        layout.model(batch, loss_reduction="sum").backward()
        backward_end = time.perf_counter()
        layout.finish_gradients()
        optimizer.step()
    plain_state = build_optimizer(build_model(cfg.model, 0), cfg)
    for p in plain_state.param_groups[0]["params"] + plain_state.param_groups[1]["params"]:
        p.grad = torch.zeros_like(p)
    plain_state.step()
    state = optimizer.inner.state if zero else optimizer.state  # ZeroAdamW: a torch AdamW over its slices
    state_bytes = sum(t.numel() * t.element_size() for s in state.values() for t in s.values())
    return dict(launched_unarmed=launched_unarmed, at_embedding=seen["at_embedding"], buckets=len(sync.buckets),
                first_launch_before_end=sync.launch_times[0][1] < backward_end,
                sent_bytes=tally.total_sent(), kinds=sorted(tally.calls),
                gradient_bytes=sum(p.numel() * p.element_size() for p in layout.parameters()),
                padded_bytes=sum(b.numel * 4 for b in sync.buckets),
                state_bytes=state_bytes,
                plain_state_bytes=sum(t.numel() * t.element_size() for s in plain_state.state.values()
                                      for t in s.values()))


def data_parallel_worker(cases: list[dict]) -> dict:
    mesh = init_mesh(make_config(cases[0]["model"], cases[0]["seq_len"], **cases[0]["parallel"]))
    return dict(failures=[f for case in cases for f in compare_layout(case, mesh)],
                volume={zero: overlap_and_volume(zero) for zero in (0, 1)})


def test_data_parallel():
    drawn = [case for zero in (0, 1) for case in draw_cases(data_parallel_case(zero), 3)]
    results = launch(data_parallel_worker, 2, drawn, timeout=240)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for rank, result in enumerate(results):
        for zero, v in result["volume"].items():
            where = f"rank {rank} zero={zero}: {v}"
            assert v["launched_unarmed"] == 0, "a non-final microbatch must not communicate: " + where
            # Some buckets were already reducing when backward reached the embedding, its last step.
            assert 1 <= v["at_embedding"] < v["buckets"], where
            assert v["first_launch_before_end"], where
            # Ring all-reduce (or reduce-scatter + all-gather) sends 2 (dp-1)/dp of the buffers: dp=2 -> 1x.
            assert v["sent_bytes"] == v["padded_bytes"], where
            assert v["kinds"] == (["all_gather", "reduce_scatter"] if zero else ["all_reduce"]), where
            assert v["gradient_bytes"] <= v["padded_bytes"] <= v["gradient_bytes"] + 4 * v["buckets"], where
            if zero:  # half of AdamW's moments, plus a step counter per shard
                assert v["state_bytes"] <= v["plain_state_bytes"] / 2 + 8 * v["buckets"] + 4 * v["buckets"], where
            else:
                assert v["state_bytes"] == v["plain_state_bytes"], where
