"""The scorer on every training layout equals the single-device scorer on the same weights: per-option
log-likelihoods within 1e-5 (fp32) and the same predictions and greedy generations, under gloo for tp=2 with
sequence parallelism, pp=2 (pipelined microbatches), dp=2 and dp=2 x pp=2 x tp=2; the dp deal balances work and keeps request order."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from flan.layout_scorer import deal
from flan.scorer import EvalRequest
from tests.engine.parallel.launch import launch

WORDS = "the cat sat on a mat while dogs ran far away to sea and birds flew over hills".split()


def _requests() -> list[EvalRequest]:
    out = []
    for k in range(11):
        prompt = " ".join(WORDS[(k * 3 + j) % len(WORDS)] for j in range(2 + (k * 5) % 9))
        if k % 3 == 2:
            out.append(EvalRequest("gen", 0, k, prompt, "far away"))
        else:
            opts = ("yes", "no", "maybe so")[: 2 + k % 2] if k % 2 else ("dogs ran far", "birds")
            out.append(EvalRequest("rank", 0, k, prompt, opts[0], opts, 0))
    return out


def layout_worker(parallel: dict) -> list[str]:
    from engine.model import build_model
    from engine.parallel import init_mesh, parallelize
    from flan.layout_scorer import score_with_layout
    from flan.scorer import RankResult, score_requests
    from tests.flan.conftest import WordTokenizer, small_layout_config

    cfg = small_layout_config(parallel, vocab_size=1000, n_layers=2, init_std=0.1)
    tok, reqs = WordTokenizer(), _requests()
    kwargs = dict(batch_size=3, input_len=12, max_new_tokens=4)
    want = score_requests(build_model(cfg.model, seed=5).eval(), tok, reqs, **kwargs)
    layout = parallelize(build_model(cfg.model, seed=5).eval(), cfg, init_mesh(cfg))
    got = score_with_layout(layout, tok, reqs, **kwargs)
    failures = []
    for r, g, w in zip(reqs, got, want):
        if isinstance(w, RankResult):
            worst = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs))
            if worst > 1e-5 or (g.n_tokens, g.n_bytes, g.prediction) != (w.n_tokens, w.n_bytes, w.prediction):
                failures.append(f"{parallel} request {r.example}: {g} vs {w} (|diff| {worst:.2e})")
        elif (g.tokens, g.text, g.truncated) != (w.tokens, w.text, w.truncated):
            failures.append(f"{parallel} request {r.example}: generated {g.tokens} vs {w.tokens}")
    return failures


@pytest.mark.parametrize("parallel,world", [
    (dict(tp=2, sp=True), 2),
    (dict(pp=2, microbatches=3), 2),
    (dict(dp=2), 2),
    (dict(dp=2, pp=2, tp=2, microbatches=2), 8),
], ids=["tp2-sp", "pp2", "dp2", "dp2-pp2-tp2"])
def test_every_layout_scores_like_one_device(parallel, world):
    failures = [f for rank in launch(layout_worker, world, parallel, timeout=120) for f in rank]
    assert not failures, "\n".join(failures)


@given(st.lists(st.integers(1, 50), min_size=0, max_size=30), st.integers(1, 4))
def test_deal_covers_every_request_once_with_balanced_work(work, ranks):
    shares = deal(work, ranks)
    assert sorted(i for s in shares for i in s) == list(range(len(work)))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(work[i] for i in s) for s in shares]
    assert not work or max(loads) - min(loads) <= max(work)  # greedy longest-first: within one request


def eval_command_worker(argv: list[str]) -> int:
    from tests.flan.test_scorer import run_flan

    return run_flan(argv)


def test_flan_eval_under_tp2_pp2_writes_the_one_device_scores(tmp_path, shared_data):
    import json

    from engine.checkpoint import save_weights
    from engine.config import Config, ModelConfig, load_config
    from engine.model import build_model
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config("configs/tiny.toml"))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=4, d_ff=32))
    cfg.data.tokenizer, cfg.train.run_dir = str(tok.path), str(tmp_path / "run")
    save_weights(tmp_path / "run", 1, build_model(cfg.model, seed=0).state_dict(), {"config": cfg.to_dict()}, keep=1)
    argv = ["eval", "configs/tiny.toml", "--checkpoint", str(tmp_path / "run"), "--base", "none", "--datasets",
            "rte,common_gen", "--templates", "0", "--limit", "4", "--eval.max_new_tokens=3", "--train.device=cpu"]
    assert launch(eval_command_worker, 1, argv + ["--out", str(tmp_path / "one")]) == [0]
    assert launch(eval_command_worker, 4, argv + ["--out", str(tmp_path / "four"), "--parallel.tp=2",
                                                  "--parallel.pp=2"], timeout=120) == [0] * 4
    one, four = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "four"))
    assert [(r["dataset"], r["metric"], r["value"]) for r in one["rows"]] == \
           [(r["dataset"], r["metric"], r["value"]) for r in four["rows"]]
    assert four["provenance"]["models"]["tuned"]["layout"]["tp"] == 2
    lines = [(tmp_path / d / "samples" / "rte.jsonl").read_text().splitlines() for d in ("one", "four")]
    for a, b in zip(*lines):
        a, b = json.loads(a), json.loads(b)
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5
