"""The kernels as torch.library custom ops: fake implementations agree with the real ones (opcheck),
and meta tensors, fake-tensor tracing and torch.compile(fullgraph=True) go through the model with the
Triton kernels chosen."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from engine.batch import Batch
from engine.config import ModelConfig
from engine.model import Transformer, build_model
from kernels.attention import attention_segments

TINY = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=48,
                   attention="triton", loss="triton")
SEGMENTS = torch.tensor([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4], dtype=torch.int32)


def op_samples():
    """(op, args) for every custom op, on tiny real inputs."""
    gen = torch.Generator().manual_seed(0)
    q, do = torch.randn(2, 16, 2, 32, generator=gen), torch.randn(2, 16, 2, 32, generator=gen)
    k, v = torch.randn(2, 16, 1, 32, generator=gen), torch.randn(2, 16, 1, 32, generator=gen)
    seg = attention_segments(SEGMENTS)
    out, lse = torch.ops.flan.flash_attention_fwd(q, k, v, seg.ids, seg.bounds, True, 0.2, False)
    logits, target = torch.randn(6, 20, generator=gen), torch.tensor([1, 2, -100, 4, 5, 19])
    hidden, weight = torch.randn(6, 8, generator=gen), torch.randn(20, 8, generator=gen)
    scale = torch.full((1,), 0.25)
    return [
        (torch.ops.flan.flash_attention_fwd, (q, k, v, seg.ids, seg.bounds, True, 0.2, False)),
        (torch.ops.flan.flash_attention_fwd, (q, k, v, None, None, False, 0.2, True)),
        (torch.ops.flan.flash_attention_bwd, (do, q, k, v, out, lse, seg.ids, seg.bounds, True, 0.2, False, False)),
        (torch.ops.flan.flash_attention_bwd, (do, q, k, v, out, lse, seg.ids, seg.bounds, True, 0.2, True, True)),
        (torch.ops.flan.cross_entropy, (logits, target, scale, -100, 0.1, 1e-3, True)),
        (torch.ops.flan.cross_entropy, (logits, target, scale, -100, 0.0, 0.0, False)),
        (torch.ops.flan.cross_entropy_, (logits.clone(), target, scale, -100, 0.0, 0.0)),
        (torch.ops.flan.linear_cross_entropy, (hidden, weight, target, scale, -100, 0.0, 0.0, 4, True, True)),
        (torch.ops.flan.scale_grad_, (logits.clone(), torch.tensor(2.0), False)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_fake_implementations_agree_with_the_kernels(index):
    op, args = op_samples()[index]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_meta_model_runs_forward_and_backward(packed):
    """No memory, no kernel: every op dispatches to its fake on the meta device."""
    with torch.device("meta"):
        model = Transformer(TINY)
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    batch = Batch(tokens=tokens, labels=tokens, segment_ids=SEGMENTS.to("meta") if packed else None)
    model(batch).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("loss, ce_op", [("triton", "flan.cross_entropy_"), ("fused", "flan.linear_cross_entropy")])
def test_fake_tensor_trace_records_the_kernels(loss, ce_op):
    model = build_model(dataclasses.replace(TINY, loss=loss), seed=0)
    params = dict(model.named_parameters())

    def loss_and_grads(params, tokens, segment_ids):
        batch = Batch(tokens=tokens, labels=tokens, segment_ids=segment_ids)
        value = torch.func.functional_call(model, params, (batch,))
        return value, torch.autograd.grad(value, list(params.values()))

    graph = make_fx(loss_and_grads, tracing_mode="fake")(params, torch.zeros(2, 16, dtype=torch.long), SEGMENTS)
    for op in ("flan.flash_attention_fwd", "flan.flash_attention_bwd", ce_op):
        assert op in graph.code, f"{op} is not in the traced graph"


def test_torch_compile_fullgraph_matches_eager():
    """One graph, no break, for forward and backward through both kernels (aot_eager: no C++ build)."""
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = Batch(tokens=tokens, labels=tokens.roll(-1, dims=1), segment_ids=SEGMENTS)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build_model(TINY, seed=2)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        value = run(batch)
        value.backward()
        results.append((value.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for ours, ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
