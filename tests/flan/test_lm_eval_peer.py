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


LM_EVAL_PROMPT = "{premise}\nQuestion: {hypothesis} Options: yes, no\nAnswer:"


def test_an_included_lm_eval_style_dataset_scores_like_lm_eval(setup, shared_data, tmp_path):
    """A dataset declared with data files only (task file, template with its own options and delimiter, a
    JSONL folder, all outside the package) scores as lm-eval's own rendering of the same prompt does."""
    import json

    from flan.peer import hflm
    from lm_eval import simple_evaluate
    from tests.flan.test_scorer import run_flan

    _, _, hf_dir, _, root = setup
    inc = tmp_path / "mine"
    (inc / "tasks").mkdir(parents=True)
    (inc / "templates").mkdir()
    (inc / "data" / "rte_lm").mkdir(parents=True)
    rows = (shared_data / "rte" / "validation.jsonl").read_text().splitlines()[:12]
    data = inc / "data" / "rte_lm" / "validation.jsonl"
    data.write_text("\n".join(rows) + "\n")
    (inc / "tasks" / "rte_lm.toml").write_text(
        'name = "rte_lm"\ncluster = "nli"\npaper_dataset = "RTE"\nkind = "cls"\nmetric = "accuracy"\n'
        'data = "data/rte_lm"\n[fields]\npremise = "text"\nhypothesis = "text"\nlabel = "text"\n'
        'label_idx = "int"\nidx = "int"\n[labels]\nfield = "label"\nvalues = ["entailment", "not_entailment"]\n'
        'options = ["yes", "no"]\n')
    (inc / "templates" / "rte_lm.toml").write_text(
        "[[template]]\ninput = " + json.dumps(LM_EVAL_PROMPT) + '\ntarget = "{answer_}"\noptions = "none"\n'
        'delimiter = " "\n')
    out = tmp_path / "eval"
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(root / "run"), "--base", "none", "--include",
                     str(inc), "--datasets", "rte_lm", "--templates", "0", "--out", str(out)]) == 0
    ours = {s["example"]: s for s in map(json.loads, (out / "samples" / "rte_lm.jsonl").read_text().splitlines())}
    assert sorted(ours) == list(range(12))
    assert ours[0]["prompt"].endswith("Options: yes, no\nAnswer:") and "OPTIONS" not in ours[0]["prompt"]
    lm_task = {"task": "rte_lm_peer", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
               "test_split": "test", "output_type": "multiple_choice",
               "doc_to_text": LM_EVAL_PROMPT.replace("{", "{{").replace("}", "}}"), "doc_to_choice": ["yes", "no"],
               "doc_to_target": "{{label_idx}}", "target_delimiter": " ", "metric_list": [{"metric": "acc"}]}
    peer = simple_evaluate(model=hflm(hf_dir, batch_size=8), tasks=[lm_task], log_samples=True, verbosity="ERROR")
    samples = peer["samples"]["rte_lm_peer"]
    assert len(samples) == 12
    for s in samples:
        theirs = [float(r[0][0]) for r in s["resps"]]
        assert ours[s["doc_id"]]["logprobs"] == pytest.approx(theirs, abs=1e-4)
        assert ours[s["doc_id"]]["gold"] == s["target"]
