"""The memory-lean cross-entropy paths: in-place gradient over the logits, linear CE chunking and its fp32
weight-gradient accumulation, the skipped multiply for an upstream gradient of 1."""
from __future__ import annotations

import sys

import pytest
import torch

import kernels.cross_entropy  # noqa: F401  (the module; `kernels.cross_entropy` is also the function)
from kernels.cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy

ce = sys.modules["kernels.cross_entropy"]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("options", [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3),
                                     dict(reduction="none")], ids=["mean", "smooth-zloss-sum", "none"])
def test_inplace_equals_allocating(dtype, options):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(9, 50, generator=gen)).to(dtype)
    target = torch.randint(0, 50, (9,), generator=gen)
    target[2] = -100
    upstream = torch.rand(9, generator=gen) + 0.5 if options["reduction"] == "none" else torch.tensor(1.7)
    results = {}
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        x = leaf * 1  # an intermediate, like the model's projection output
        loss = cross_entropy(x, target, inplace=inplace, **options)
        loss.backward(upstream)
        results[inplace] = (loss.detach(), leaf.grad, x.detach())
    (loss_a, grad_a, x_a), (loss_b, grad_b, x_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert torch.equal(x_a, logits), "the allocating path must leave the logits alone"
    assert not torch.equal(x_b, logits), "the in-place path writes the gradient over the logits"
    ref_leaf = logits.float().requires_grad_()
    ref = cross_entropy_reference(ref_leaf, target, **options)
    ref.backward(upstream)
    assert relative(loss_b, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert relative(grad_b, ref_leaf.grad) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_inplace_on_logits_another_op_saved_is_caught():
    """x * x saves x (and its version): overwriting x with its gradient fails loudly in backward."""
    leaf = torch.randn(4, 10, requires_grad=True)
    x = leaf * 1
    side = (x * x).sum()  # mul saves x
    loss = cross_entropy(x, torch.tensor([1, 2, 3, 4]), inplace=True) + side
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_means_no_overwrite():
    logits = torch.randn(4, 10)
    kept = logits.clone()
    cross_entropy(logits, torch.tensor([1, 2, 3, 4]), inplace=True)
    assert torch.equal(logits, kept)


def test_upstream_gradient_of_one_skips_the_multiply(monkeypatch):
    calls = []
    real_mul = torch.Tensor.mul_
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, *a: calls.append(1) or real_mul(self, *a))
    leaf = torch.randn(5, 12, requires_grad=True)
    cross_entropy(leaf, torch.tensor([0, 1, 2, 3, 4])).backward()
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(12, 8, requires_grad=True)
    linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3, 4])).backward()
    assert calls == [], "an upstream gradient of exactly 1 still multiplied the gradient"
    (2 * cross_entropy(leaf, torch.tensor([0, 1, 2, 3, 4]))).backward()
    assert calls == [1]


def test_auto_chunk_size_is_at_least_2048_rows_within_the_budget():
    assert ce._auto_chunk_size(8192, 128256, 4096, 2) == 2048  # Liger's sizing would give 256
    assert ce._auto_chunk_size(100, 128256, 4096, 2) == 100  # never more rows than there are
    assert ce._auto_chunk_size(65536, 262144, 1024, 4) == 1024  # 2048 rows of fp32 would pass 1 GiB
    assert ce._auto_chunk_size(65536, 512, 4096, 2) == 65536  # Liger's sizing, when it is larger


def test_linear_weight_gradient_accumulates_in_fp32():
    """fp16 inputs, 64 chunks: grad_W is summed in fp32 and rounded once. The same chunk products summed
    in fp16 (the former accumulation) are measured alongside and are several times further off."""
    gen = torch.Generator().manual_seed(0)
    N, D, V, chunk = 256, 16, 32, 4
    hidden = (torch.randn(N, D, generator=gen) + 1.0).half()  # same-sign inputs: the sum grows over chunks
    weight = (0.1 * torch.randn(V, D, generator=gen)).half()
    target = torch.randint(0, V, (N,), generator=gen)
    leaf = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, leaf, target, reduction="sum", chunk_size=chunk).backward()
    ref_weight = weight.float().requires_grad_()
    cross_entropy_reference(hidden.float() @ ref_weight.t(), target, reduction="sum").backward()
    ours = relative(leaf.grad, ref_weight.grad)
    dlogits = torch.softmax(hidden.float() @ weight.float().t(), dim=-1)
    dlogits[torch.arange(N), target] -= 1
    fp16_sum = torch.zeros(V, D, dtype=torch.half)
    for start in range(0, N, chunk):
        rows = slice(start, start + chunk)
        fp16_sum = (fp16_sum.float() + (dlogits[rows].half().t().float() @ hidden[rows].float()).half()).half()
    assert ours < relative(fp16_sum, ref_weight.grad) / 2.5, (ours, relative(fp16_sum, ref_weight.grad))
    assert leaf.grad.dtype == torch.float16


def test_model_loss_path_overwrites_its_logits_and_matches_torch():
    """The model's loss="triton" path (in-place) gives the loss and gradients of loss="torch"."""
    import dataclasses

    from engine.batch import Batch
    from engine.config import ModelConfig
    from engine.model import build_model

    tiny = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=48)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 12), generator=gen)
    batch = Batch(tokens=tokens, labels=tokens.roll(-1, dims=1))
    results = {}
    for impl in ("torch", "triton"):
        model = build_model(dataclasses.replace(tiny, loss=impl), seed=3)
        loss = model(batch)
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
