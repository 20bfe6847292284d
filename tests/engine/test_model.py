"""The single-device model: causality, segment isolation, RoPE restart, GQA, init, KV-cache decoding."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.batch import Batch, positions_from_segments
from engine.config import ModelConfig
from engine.model import KVCache, Transformer, build_model


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model():
    return build_model(small_cfg(), seed=0).eval()


def logits(model, tokens, segments=None):
    with torch.no_grad():
        return model(Batch(tokens=tokens, segment_ids=segments))


@settings(max_examples=15, deadline=None)
@given(S=st.integers(2, 24), cut=st.data())
def test_changing_a_later_token_never_changes_earlier_logits(model, S, cut):
    t = cut.draw(st.integers(1, S - 1))
    tokens = torch.randint(0, 97, (1, S), generator=torch.Generator().manual_seed(S))
    changed = tokens.clone()
    changed[0, t:] = (changed[0, t:] + 1) % 97
    a, b = logits(model, tokens), logits(model, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.equal(a[:, t], b[:, t])


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=2, max_size=4), which=st.data())
def test_changing_one_packed_segment_never_changes_another(model, lengths, which):
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None].int()
    tokens = torch.randint(0, 97, seg.shape, generator=torch.Generator().manual_seed(len(lengths)))
    victim = which.draw(st.integers(1, len(lengths)))
    changed = tokens.clone()
    changed[seg == victim] = (changed[seg == victim] + 5) % 97
    a, b = logits(model, tokens, seg), logits(model, changed, seg)
    others = (seg != victim)[0]
    torch.testing.assert_close(a[0, others], b[0, others], rtol=0, atol=0)


def test_packed_segment_equals_the_same_example_alone(model):
    """RoPE positions restart per segment: a packed example's logits equal those of the example on its own."""
    first, second = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    seg = torch.tensor([[1] * 7 + [2] * 9 + [0] * 3], dtype=torch.int32)
    packed = torch.cat([first, second, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    out = logits(model, packed, seg)
    torch.testing.assert_close(out[:, 7:16], logits(model, second), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :7], logits(model, first), rtol=1e-5, atol=1e-5)


def test_positions_restart_in_every_segment():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]], dtype=torch.int32)
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_gqa_equals_multi_head_with_repeated_kv():
    gqa = build_model(small_cfg(n_kv_heads=1), seed=3).eval()
    mha = build_model(small_cfg(n_kv_heads=4), seed=3).eval()
    with torch.no_grad():
        for name, layer in gqa.layers.items():
            dst = mha.layers[name]
            for lin in ("wq", "wo"):
                getattr(dst.attn, lin).weight.copy_(getattr(layer.attn, lin).weight)
            for lin in ("wk", "wv"):
                getattr(dst.attn, lin).weight.copy_(getattr(layer.attn, lin).weight.repeat(4, 1))
            dst.mlp.load_state_dict(layer.mlp.state_dict())
        mha.tok_embeddings.weight.copy_(gqa.tok_embeddings.weight)
    tokens = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(logits(gqa, tokens), logits(mha, tokens), rtol=1e-5, atol=1e-5)


def test_head_dim_independent_of_width_and_geglu():
    m = build_model(small_cfg(d_model=24, n_heads=3, n_kv_heads=3, head_dim=32, mlp="geglu"), seed=1)
    assert m.layers["0"].attn.wq.weight.shape == (96, 24)
    assert logits(m, torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_loss_ignores_minus_100_and_matches_cross_entropy(model):
    tokens = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    labels[:, :4] = -100
    with torch.no_grad():
        loss = model(Batch(tokens=tokens, labels=labels))
        ref = torch.nn.functional.cross_entropy(logits(model, tokens).flatten(0, 1), labels.flatten())
        total = model(Batch(tokens=tokens, labels=labels), loss_reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(total / 12, ref)


def test_init_touches_every_parameter_and_scales_residual_projections():
    cfg = small_cfg(n_layers=8, init_std=0.02, tie_embeddings=False)
    m = build_model(cfg, seed=0)
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all() and p.abs().sum() > 0, name
    wo = m.layers["0"].attn.wo.weight.std().item()
    wq = m.layers["0"].attn.wq.weight.std().item()
    assert abs(wq - 0.02) < 0.004 and abs(wo - 0.02 / 4) < 0.001
    again = build_model(cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))


def test_tied_embeddings_share_one_tensor():
    m = build_model(small_cfg(), seed=0)
    assert m.output.weight is m.tok_embeddings.weight
    untied = build_model(small_cfg(tie_embeddings=False), seed=0)
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_kv_cache_decoding_matches_full_forward(model):
    """Left-padded rows decoded step by step give the logits of one full pass over each row alone."""
    prompts = [torch.randint(0, 97, (n,)) for n in (5, 3)]
    width = 5
    tokens = torch.zeros(2, width, dtype=torch.long)
    seg = torch.zeros(2, width, dtype=torch.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        seg[i, width - len(p):] = 1
    cache = KVCache()
    with torch.no_grad():
        out = model(Batch(tokens=tokens, segment_ids=seg), cache=cache)
        nxt = out[:, -1].argmax(-1)
        step = model(Batch(tokens=nxt[:, None], segment_ids=torch.ones(2, 1, dtype=torch.int32)), cache=cache)
    for i, p in enumerate(prompts):
        full = logits(model, torch.cat([p, nxt[i:i + 1]])[None])
        torch.testing.assert_close(out[i, -1], full[0, -2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step[i, -1], full[0, -1], rtol=1e-4, atol=1e-5)


def test_meta_build_allocates_nothing():
    with torch.device("meta"):
        m = Transformer(small_cfg(vocab_size=32000, d_model=8192, n_layers=2, n_heads=64, n_kv_heads=64,
                                  head_dim=128, d_ff=65536))
    assert all(p.is_meta for p in m.parameters())
