"""`flan eval` provenance and contamination guard: scores.json records what was loaded (step folder, step, commit,
config hash, held-out clusters, settings); the default clusters are the ones the checkpoint was tuned without;
a cluster it was tuned on needs --allow-seen and is labelled "seen"; --base auto is the exact init_from step."""
import json

import pytest

from engine.checkpoint import load_meta, save_weights
from engine.config import Config, ModelConfig, config_from_dict, load_config
from engine.model import build_model
from engine.run_log import config_hash, run_record
from flan.provenance import checkpoint_info, seen_clusters
from flan.registry import load_registry
from tests.flan.test_scorer import run_flan


def _run(folder, cfg, kind, steps, init_from=None, heldout=()):
    cfg.train.run_dir = str(folder)
    model = build_model(cfg.model, seed=0)
    for step in steps:
        save_weights(folder, step, model.state_dict(), {"config": cfg.to_dict()}, keep=5)
    record = run_record(kind, cfg, cfg, {"dp": 1}, 1, 1, init_from, list(heldout))
    (folder / "run.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config("configs/tiny.toml"))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                   head_dim=8, d_ff=48))
    cfg.data.tokenizer = str(tok.path)
    root = tmp_path_factory.mktemp("runs")
    base = _run(root / "base", cfg, "pretrain", [1, 2])
    first = base / "checkpoints" / "step-000001"  # not the newest: --base auto must find this exact one
    tuned = _run(root / "tuned", cfg, "tune", [3], init_from=str(first), heldout=["nli", "paraphrase"])
    return tuned, first


def test_seen_clusters_follow_the_init_from_chain(runs):
    tuned, first = runs
    info = checkpoint_info(tuned / "checkpoints" / "step-000003")
    assert info["step"] == 3 and info["heldout_clusters"] == ["nli", "paraphrase"] and info["init_from"] == str(first)
    reg = load_registry()
    seen = seen_clusters(info, reg)
    assert "nli" not in seen and "paraphrase" not in seen and "commonsense" in seen
    assert seen_clusters(checkpoint_info(first), reg) == []


def test_eval_defaults_to_heldout_clusters_and_records_provenance(runs, tmp_path):
    tuned, first = runs
    out = tmp_path / "eval"
    assert run_flan(["eval", "configs/tiny.toml", "--checkpoint", str(tuned), "--templates", "0", "--limit", "2",
                     "--out", str(out), "--no-samples"]) == 0
    assert not (out / "samples").exists()
    saved = json.loads((out / "scores.json").read_text())
    prov = saved["provenance"]
    assert set(prov["clusters"]) <= {"nli", "paraphrase"} and "nli" in prov["clusters"]
    assert not any(r["seen"] for r in saved["rows"])
    assert prov["models"]["base"]["checkpoint"] == str(first.resolve()) and prov["models"]["base"]["step"] == 1
    tuned_info = prov["models"]["tuned"]
    assert tuned_info["step"] == 3 and tuned_info["heldout_clusters"] == ["nli", "paraphrase"]
    stored = config_from_dict(load_meta(tuned / "checkpoints" / "step-000003")["config"])
    assert tuned_info["config_hash"] == config_hash(stored)
    assert prov["eval_config"]["eval"]["limit"] == 2 and prov["eval_config"]["eval"]["templates"] == "0"
    assert "commit" in prov["code"] and prov["seen_clusters"] is not None


def test_seen_cluster_needs_allow_seen_and_is_labelled(runs, tmp_path, capsys):
    tuned, _ = runs
    argv = ["eval", "configs/tiny.toml", "--checkpoint", str(tuned), "--base", "none", "--datasets", "copa",
            "--templates", "0", "--limit", "2", "--out", str(tmp_path / "e")]
    assert run_flan(argv) == 2
    assert "--allow-seen" in capsys.readouterr().err
    assert run_flan(argv + ["--allow-seen"]) == 0
    md = (tmp_path / "e" / "scores.md").read_text()
    assert "(seen)" in md.splitlines()[0] and "| copa (seen) | commonsense (seen) |" in md
    rows = json.loads((tmp_path / "e" / "scores.json").read_text())["rows"]
    assert rows and all(r["seen"] for r in rows)


def test_split_choice_and_truncation_follow_the_checkpoint(tmp_path, shared_data):
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(load_config("configs/tiny.toml"))
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
                                   head_dim=4, d_ff=32))
    cfg.data.tokenizer, cfg.data.input_len = str(tok.path), 8  # the checkpoint was tuned on 8-token inputs
    run = _run(tmp_path / "short", cfg, "pretrain", [1])
    argv = ["eval", "configs/tiny.toml", "--checkpoint", str(run), "--base", "none", "--datasets", "rte",
            "--limit", "6", "--no-samples", "--data.input_len=4096"]
    assert run_flan(argv + ["--templates", "0", "--out", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "scores.json").read_text())["rows"]
    assert {r["split"] for r in rows} == {"all"} and all(r["n"] == 6 for r in rows)
    mean = next(r for r in rows if r["template"] == "mean" and r["metric"] == "acc")
    assert mean["truncated"] == mean["requests"] == 6  # cut to the checkpoint's 8, not the config's 4096
    assert "tuned rte: 6 of 6 prompts" in (tmp_path / "all" / "scores.md").read_text()
    assert run_flan(argv + ["--templates", "0", "--split", "dev", "--out", str(tmp_path / "dev")]) == 0
    rows = json.loads((tmp_path / "dev" / "scores.json").read_text())["rows"]
    assert {r["split"] for r in rows} == {"dev"} and all(r["n"] == 3 for r in rows)
    assert run_flan(argv + ["--templates", "best", "--split", "all", "--out", str(tmp_path / "x")]) == 2
