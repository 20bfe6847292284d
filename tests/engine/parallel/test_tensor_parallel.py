"""Tensor (and sequence) parallelism equals the single-device model: logits, the loss, the forward-only pass
(summed loss, hidden states and logits at chosen positions), and through the training loop's train_step the
loss, every gradient, the gradient norm and the weights after 3 AdamW steps, on real gloo processes, in fp32,
within 1e-5 relative.

Process start-up dominates, so hypothesis draws a handful of model shapes in the parent and one launch per tp
runs them all, each with sequence parallelism off and on.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from launch import launch
from reference import Worst, compare_training, draw_cases, make_config, reference_run

from engine.batch import IGNORE_INDEX, Batch
from engine.config import ConfigError, ModelConfig, ParallelConfig
from engine.data_source import rank_rows
from engine.model import build_model
from engine.parallel import Mesh, init_mesh, parallelize
from engine.parallel import tensor
from engine.parallel.mesh import coordinates, group_ranks, resolve_degrees


@st.composite
def cases(draw, tp: int) -> dict:
    """A small model and a packed batch that tp can split (heads, kv heads, d_ff, vocab, and S for sp)."""
    n_kv_heads = tp * draw(st.sampled_from([1, 2]))
    seq_len = tp * draw(st.integers(2, 6))
    rows = draw(st.integers(1, 3))
    layouts = [(sorted(draw(st.sets(st.integers(1, seq_len - 1), max_size=3))), draw(st.integers(0, seq_len // 3)))
               for _ in range(rows)]  # (segment starts after the first, padding at the end) per row
    return dict(
        model=dict(vocab_size=tp * draw(st.integers(4, 24)), d_model=draw(st.integers(4, 40)), n_layers=2,
                   n_heads=n_kv_heads * draw(st.sampled_from([1, 2])), n_kv_heads=n_kv_heads,
                   head_dim=draw(st.sampled_from([2, 4, 8])), d_ff=tp * draw(st.integers(1, 12)),
                   mlp=draw(st.sampled_from(["swiglu", "geglu"])), tie_embeddings=draw(st.booleans())),
        seq_len=seq_len, layouts=layouts, reduction=draw(st.sampled_from(["mean", "sum"])),
        seed=draw(st.integers(0, 2**16)))


def make_batch(case: dict) -> Batch:
    gen = torch.Generator().manual_seed(case["seed"])
    S, V = case["seq_len"], case["model"]["vocab_size"]
    segment_ids = torch.zeros(len(case["layouts"]), S, dtype=torch.int32)
    for row, (starts, padding) in enumerate(case["layouts"]):
        index = torch.arange(S)
        segment_ids[row] = 1 + sum((index >= s).int() for s in starts)
        segment_ids[row, S - padding:] = 0
    tokens = torch.randint(0, V, segment_ids.shape, generator=gen)
    labels = torch.randint(0, V, segment_ids.shape, generator=gen)
    no_loss = (segment_ids == 0) | (torch.rand(segment_ids.shape, generator=gen) < 0.2)  # padding, "prompts"
    return Batch(tokens, labels.masked_fill(no_loss, IGNORE_INDEX), segment_ids)


def compare_one(case: dict, tp: int, sp: bool, mesh: Mesh) -> list[str]:
    """Every quantity further than the tolerance from the single device, tensor parallel vs one device."""
    cfg = make_config(case["model"], case["seq_len"], tp=tp, sp=sp)
    single = build_model(cfg.model, case["seed"])
    layout = parallelize(build_model(cfg.model, case["seed"]), cfg, mesh)
    batch = make_batch(case)
    worst = Worst()
    with torch.no_grad():
        logits_batch = Batch(batch.tokens, segment_ids=batch.segment_ids)
        worst.note("logits", layout.model(logits_batch), single(logits_batch))
        reduction = case["reduction"]
        worst.note("loss", layout.model(batch, loss_reduction=reduction), single(batch, loss_reduction=reduction))
        worst.note("summed_loss", layout.summed_loss(batch), single(batch, loss_reduction="sum"))
        B, S = batch.tokens.shape
        rows, positions = torch.arange(B).repeat_interleave(S), torch.arange(S).repeat(B)  # every position
        hidden = single(batch, return_hidden=True)[rows, positions]
        worst.note("hidden_at", layout.hidden_at(batch, rows, positions), hidden)
        worst.note("logits_at", layout.logits_at(batch, rows, positions), single.output(hidden))
    compare_training(layout, batch, reference_run(cfg, batch, case["seed"]), worst)
    return worst.failures(f"tp={tp} sp={sp} rank {mesh.rank} case {case}")


def compare_worker(drawn: list[dict], tp: int) -> list[str]:
    mesh = init_mesh(make_config(drawn[0]["model"], drawn[0]["seq_len"], tp=tp))
    return [f for case in drawn for sp in (False, True) for f in compare_one(case, tp, sp, mesh)]


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_single_device(tp):
    # Hypothesis draws the cases (the simplest first, then random ones); they run in one multi-process launch,
    # since process start-up is the cost.
    drawn = draw_cases(cases(tp), 4)
    failures = [f for rank_failures in launch(compare_worker, tp, drawn, tp) for f in rank_failures]
    assert not failures, "\n".join(failures)


def test_kernel_losses_under_tensor_parallelism():
    """model.loss="fused": the single device runs the fused Triton kernel, tp=2 the vocab-parallel Triton one."""
    case = dict(model=dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=16,
                           tie_embeddings=True, loss="fused"),
                seq_len=8, layouts=[([3], 1), ([], 0)], reduction="mean", seed=3)
    failures = launch(compare_worker, 2, [case], 2)[0]
    assert not failures, "\n".join(failures)


def uneven_sequence_worker() -> str:
    model = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=16)
    cfg = make_config(model, 8, tp=2, sp=True)
    layout = parallelize(build_model(cfg.model, seed=0), cfg, init_mesh(cfg))
    with pytest.raises(ValueError) as error:
        layout.model(Batch(torch.zeros(1, 9, dtype=torch.long)))
    return str(error.value)


def test_sequence_parallelism_needs_tp_to_divide_the_sequence():
    for message in launch(uneven_sequence_worker, 2):
        assert "sequence length 9 does not divide by parallel.tp=2" in message


def test_group_layout_is_tp_innermost_then_pp_then_dp():
    assert group_ranks(2, 2, 2, "t") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(2, 2, 2, "p") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_ranks(2, 2, 2, "d") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(2, 2, 2, "pt") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert coordinates(6, 2, 2, 2) == (1, 1, 0)


def test_degrees_from_world_size_and_their_errors():
    assert resolve_degrees(8, ParallelConfig(tp=2, pp=2)) == (2, 2, 2)
    with pytest.raises(ConfigError, match="--parallel.tp=4 x --parallel.pp=1 = 4 does not divide the world size 6"):
        resolve_degrees(6, ParallelConfig(tp=4))
    with pytest.raises(ConfigError, match="--parallel.dp=3 x --parallel.pp=1 x --parallel.tp=2 = 6"):
        resolve_degrees(4, ParallelConfig(dp=3, tp=2))


def test_tp_must_divide_kv_heads():
    model = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=4,
                                    d_ff=32), seed=0)
    with pytest.raises(ValueError, match=r"parallel.tp=4: 4 does not divide model.n_kv_heads=2.*\[1, 2\]"):
        tensor.apply_tensor_parallel(model, Mesh(tp=4), sequence_parallel=False)


def test_a_module_missing_from_the_plan_is_an_error():
    model = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4,
                                    d_ff=32), seed=0)
    model.layers["0"].mlp.extra = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match="'layers.0.mlp.extra' .* has no entry in TP_PLAN"):
        tensor.apply_tensor_parallel(model, Mesh(tp=2), sequence_parallel=False)


def test_rank_rows_gives_each_data_parallel_rank_its_rows():
    batch = Batch(torch.arange(24).view(6, 4))
    assert torch.equal(rank_rows(batch, 1, 3).tokens, batch.tokens[2:4])
    assert torch.equal(torch.cat([rank_rows(batch, r, 2).tokens for r in range(2)]), batch.tokens)
    with pytest.raises(ValueError, match="6 rows does not divide by parallel.dp=4"):
        rank_rows(batch, 0, 4)


def test_vocab_parallel_cross_entropy_on_one_rank_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=gen, requires_grad=True)
    target = torch.randint(0, 7, (10,), generator=gen)
    target[[2, 5]] = IGNORE_INDEX
    upstream = torch.rand(10, generator=gen)
    got = tensor._VocabParallelCrossEntropy.apply(logits, target, 0, None)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), logits)
    want = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    (grad_want,) = torch.autograd.grad((want * upstream).sum(), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)


def test_single_process_clip_matches_torch():
    model = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=32)
    cfg = make_config(model, 8)
    layout = parallelize(build_model(cfg.model, seed=0), cfg, Mesh())
    layout.model(make_batch(dict(seq_len=8, layouts=[([3], 1)], seed=1, model=dict(vocab_size=64)))).backward()
    want_grads = [p.grad.clone() for p in layout.parameters()]
    want = torch.nn.utils.clip_grad_norm_([_with_grad(g) for g in want_grads], 0.1)
    got = layout.clip_gradients(0.1)
    assert got == pytest.approx(float(want), rel=1e-6)
    for p, g in zip(layout.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g * min(1.0, 0.1 / (float(want) + 1e-6)))


def _with_grad(grad: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty_like(grad))
    p.grad = grad.clone()
    return p
