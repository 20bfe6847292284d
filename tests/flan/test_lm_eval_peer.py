"""Checked against a peer: lm-evaluation-harness (HFLM on our exported model, a task built from our rendered
prompts and options) gives the same per-option log-likelihoods (within 1e-4) and the same accuracies."""
import os

# Everything is local: no hub lookups for the model folder or the JSON task data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from engine.checkpoint import save_weights  # noqa: E402
from engine.config import Config, ModelConfig, load_config  # noqa: E402
from engine.hf import export_hf  # noqa: E402
from engine.model import build_model  # noqa: E402
from flan.evaluate import build_requests  # noqa: E402
from flan.loaders import load_split  # noqa: E402
from flan.registry import load_registry  # noqa: E402
from flan.scorer import rank_classify  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is a test extra (requirements-test.txt)")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (requirements-test.txt)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config("configs/tiny.toml"))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=16, d_ff=128))
    cfg.data.tokenizer = str(tok.path)
    model = build_model(cfg.model, seed=11).eval()
    root = tmp_path_factory.mktemp("peer")
    step = save_weights(root / "run", 1, model.state_dict(), {"config": cfg.to_dict()}, keep=1)
    registry = load_registry()
    requests = []
    # rte: long prompts, one-token options; copa: sentence options (the continuation pass over the cache).
    for name in ("rte", "copa"):
        spec = registry.get(name)
        rows = load_split(spec, "validation", data_dir=shared_data).rows
        requests += build_requests(spec, rows, list(range(10)), 0)
    return model, tok, export_hf(step, root / "hf"), requests, root


def test_lm_eval_agrees_with_our_scorer(setup):
    from flan.peer import hflm, lm_eval_scores, same_tokens

    model, tok, hf_dir, requests, root = setup
    lm = hflm(hf_dir, batch_size=8)
    assert same_tokens(lm.tokenizer, tok, requests) == []  # the harness sees exactly our token ids
    ours = rank_classify(model, tok, requests, batch_size=8, input_len=2048)
    peer = lm_eval_scores(lm, requests, root / "task")
    assert len(peer.logprobs) == len(ours) == 20
    for mine, theirs in zip(ours, peer.logprobs):
        assert list(mine.logprobs) == pytest.approx(theirs, abs=1e-4)
    golds = [r.gold for r in requests]
    assert sum(r.prediction == g for r, g in zip(ours, golds)) / 20 == pytest.approx(peer.acc)
    # lm-eval's acc_norm divides by the option's characters: our per-byte variant on ASCII options.
    assert all(o.isascii() for r in requests for o in r.options)
    assert sum(r.prediction_per_byte == g for r, g in zip(ours, golds)) / 20 == pytest.approx(peer.acc_norm)
