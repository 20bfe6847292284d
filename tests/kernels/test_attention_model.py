"""The model gives the same logits and gradients with the Triton kernel as with its PyTorch attention."""
from __future__ import annotations

import dataclasses

import pytest
import torch

model_module = pytest.importorskip("engine.model", reason="engine/model.py is not importable yet")
from engine.batch import Batch  # noqa: E402
from engine.config import ModelConfig  # noqa: E402

TINY = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=96)


def logits_and_grads(attention: str, batch: Batch):
    model = model_module.build_model(dataclasses.replace(TINY, attention=attention), seed=7)
    logits = model(batch)  # (B, S, V)
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)  # an upstream gradient that is not all ones
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_triton_and_torch_attention_agree_in_the_model():
    gen = torch.Generator().manual_seed(0)
    B, S = 2, 40
    tokens = torch.randint(0, TINY.vocab_size, (B, S), generator=gen)
    segment_ids = torch.tensor([[1] * 9 + [2] * 1 + [3] * 22 + [0] * 8,
                                [1] * 40], dtype=torch.int32)
    batch = Batch(tokens=tokens, segment_ids=segment_ids)
    ref_logits, ref_grads = logits_and_grads("torch", batch)
    logits, grads = logits_and_grads("triton", batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_unpacked_batch_passes_no_segments_and_packed_ones_are_prepared_once(monkeypatch):
    """A Batch built without segment ids reaches the kernel with None; a packed one with its bounds,
    computed once per forward (not per layer); both agree with the PyTorch attention."""
    import kernels.attention as attn

    seen, prepared = [], []
    real_flash, real_prepare = attn.flash_attention, attn.attention_segments
    monkeypatch.setattr(attn, "flash_attention", lambda *a, **kw: seen.append(kw["segment_ids"]) or
                        real_flash(*a, **kw))
    monkeypatch.setattr(attn, "attention_segments", lambda *a, **kw: prepared.append(1) or real_prepare(*a, **kw))
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    unpacked = Batch(tokens=tokens)
    assert not unpacked.packed and not unpacked.slice_rows(0, 1).packed and not unpacked.to("cpu").packed
    ref_logits, _ = logits_and_grads("torch", unpacked)
    logits, _ = logits_and_grads("triton", unpacked)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert seen == [None] * TINY.n_layers and prepared == []
    seen.clear()
    packed = Batch(tokens=tokens, segment_ids=torch.tensor([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4]))
    logits_and_grads("triton", packed)
    assert prepared == [1] and len(seen) == TINY.n_layers and all(s is seen[0] for s in seen)
