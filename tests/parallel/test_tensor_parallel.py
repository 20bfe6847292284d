"""Tensor (and sequence) parallelism equals the single-device model: logits, loss, every gradient, the gradient
norm and the weights after 3 AdamW steps, on real gloo processes, in fp32, within 1e-5 relative.

Process start-up dominates, so hypothesis draws a handful of model shapes in the parent and one launch per tp
runs them all, each with sequence parallelism off and on.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from launch import launch
from reference import draw_cases

from engine.batch import IGNORE_INDEX, Batch
from engine.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, ParallelConfig
from engine.model import build_model
from engine.optim import build_optimizer
from engine.parallel import Mesh, clip_grad_norm, finalize_grads, full_state_dict, init_mesh, local_batch, parallelize
from engine.parallel import comm, tensor
from engine.parallel.mesh import coordinates, group_ranks, resolve_degrees

TOLERANCE = 1e-5  # fp32: only the order of the partial sums differs between layouts
STEPS = 3


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


def make_config(case: dict, tp: int, sp: bool) -> Config:
    # Adam divides each gradient by its own magnitude, so the fp32 noise of near-zero gradients becomes an
    # O(lr) step difference: lr 1e-3, eps 1e-6 and init_std 0.1 keep the weights of these tiny models well
    # above it (reference.make_config explains the same choice for the pipeline and data-parallel tests).
    return Config(model=ModelConfig(**{"init_std": 0.1, **case["model"]}), parallel=ParallelConfig(tp=tp, sp=sp),
                  optim=OptimConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, grad_clip=0.5, warmup_steps=0),
                  data=DataConfig(seq_len=case["seq_len"])).validate("test case")


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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


def full_grads(model: torch.nn.Module, mesh: Mesh) -> dict[str, torch.Tensor]:
    dims = tensor.shard_dims(model)
    return {name: comm.all_gather(p.grad, mesh.tp_group, dims[name]) if name in dims else p.grad
            for name, p in model.named_parameters()}


def compare_one(case: dict, tp: int, sp: bool, mesh: Mesh) -> dict[str, tuple[float, str]]:
    """Worst relative error per quantity (with the tensor that had it), tensor parallel vs single device."""
    cfg = make_config(case, tp, sp)
    single = build_model(cfg.model, case["seed"])
    parallel = parallelize(build_model(cfg.model, case["seed"]), cfg, mesh)
    batch = make_batch(case)
    worst: dict[str, tuple[float, str]] = {}

    def note(quantity: str, got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
        err = relative_error(got.detach(), want.detach())
        if err >= worst.get(quantity, (-1.0, ""))[0]:
            worst[quantity] = (err, name)

    with torch.no_grad():
        logits_batch = Batch(batch.tokens, segment_ids=batch.segment_ids)
        note("logits", parallel(logits_batch), single(logits_batch))
    optimizers = build_optimizer(single, cfg), build_optimizer(parallel, cfg)
    for step in range(STEPS):
        losses = [model(batch, loss_reduction=case["reduction"]) for model in (single, parallel)]
        note("loss", losses[1], losses[0], f"step {step}")
        for loss in losses:
            loss.backward()
        finalize_grads(single, Mesh())
        finalize_grads(parallel, mesh)
        if step == 0:
            want = full_grads(single, Mesh())
            for name, got in full_grads(parallel, mesh).items():
                note("gradient", got, want[name], name)
        norms = clip_grad_norm(single, cfg.optim.grad_clip, Mesh()), clip_grad_norm(parallel, cfg.optim.grad_clip, mesh)
        note("grad_norm", torch.tensor(norms[1]), torch.tensor(norms[0]), f"step {step}")
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    want = single.state_dict()
    gathered = full_state_dict(parallel, mesh)
    assert gathered.keys() == want.keys()
    for name, got in gathered.items():
        assert got.shape == want[name].shape, name
        note("weights", got, want[name], name)
    return worst


def compare_worker(drawn: list[dict], tp: int) -> list[tuple[int, bool, dict]]:
    mesh = init_mesh(make_config(drawn[0], tp, sp=False))
    return [(i, sp, compare_one(case, tp, sp, mesh)) for i, case in enumerate(drawn) for sp in (False, True)]


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_single_device(tp):
    # Hypothesis draws the cases (the simplest first, then random ones); they run in one multi-process launch,
    # since process start-up is the cost.
    drawn = draw_cases(cases(tp), 4)
    for rank, results in enumerate(launch(compare_worker, tp, drawn, tp)):
        for i, sp, worst in results:
            for quantity, (err, name) in worst.items():
                assert err < TOLERANCE, (f"tp={tp} sp={sp} rank {rank} case {drawn[i]}: {quantity} {name} "
                                         f"relative error {err:.2e}")


def test_kernel_losses_under_tensor_parallelism():
    """model.loss="fused": the single device runs the fused Triton kernel, tp=2 the vocab-parallel Triton one."""
    case = dict(model=dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=16,
                           tie_embeddings=True, loss="fused"),
                seq_len=8, layouts=[([3], 1), ([], 0)], reduction="mean", seed=3)
    for i, sp, worst in launch(compare_worker, 2, [case], 2)[0]:
        for quantity, (err, name) in worst.items():
            assert err < TOLERANCE, f"sp={sp}: {quantity} {name} relative error {err:.2e}"


def uneven_sequence_worker() -> str:
    case = dict(model=dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=16),
                seq_len=8, layouts=[([], 0)], seed=0)
    cfg = make_config(case, tp=2, sp=True)
    model = parallelize(build_model(cfg.model, seed=0), cfg, init_mesh(cfg))
    with pytest.raises(ValueError) as error:
        model(Batch(torch.zeros(1, 9, dtype=torch.long)))
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
    with pytest.raises(ValueError, match=r"parallel.tp=4 does not divide model.n_kv_heads=2.*\[1, 2\]"):
        tensor.apply_tensor_parallel(model, Mesh(tp=4), sequence_parallel=False)


def test_a_module_missing_from_the_plan_is_an_error():
    model = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4,
                                    d_ff=32), seed=0)
    model.layers["0"].mlp.extra = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match="'layers.0.mlp.extra' .* has no entry in TP_PLAN"):
        tensor.apply_tensor_parallel(model, Mesh(tp=2), sequence_parallel=False)


def test_local_batch_gives_each_data_parallel_rank_its_rows():
    batch = Batch(torch.arange(24).view(6, 4))
    assert torch.equal(local_batch(batch, Mesh(dp=3, dp_rank=1)).tokens, batch.tokens[2:4])
    with pytest.raises(ValueError, match="6 rows does not divide by parallel.dp=4"):
        local_batch(batch, Mesh(dp=4))


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
    model = build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=4,
                                    d_ff=32), seed=0)
    model(make_batch(dict(seq_len=8, layouts=[([3], 1)], seed=1, model=dict(vocab_size=64)))).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    want = torch.nn.utils.clip_grad_norm_([_with_grad(g) for g in want_grads], 0.1)
    got = clip_grad_norm(model, 0.1, Mesh())
    assert got == pytest.approx(float(want), rel=1e-6)
    for p, g in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g * min(1.0, 0.1 / (float(want) + 1e-6)))


def _with_grad(grad: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty_like(grad))
    p.grad = grad.clone()
    return p
