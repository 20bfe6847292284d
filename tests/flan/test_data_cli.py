"""`flan data tasks | preview | mix` through the argparse hook flan/cli.py registers."""
import argparse
import json

import pytest

from engine.config import Config
from flan.data_cli import add_data_commands, mix_report


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="flan")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest
    code = args.func(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tasks_json_lists_every_dataset(capsys):
    code, out, _ = run(["data", "tasks", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and len(rows) == 64
    assert all(set(r) == {"name", "cluster", "kind", "templates", "examples"} for r in rows.values())
    assert rows["rte"] == {"name": "rte", "cluster": "nli", "kind": "cls", "templates": 10, "examples": 2490}
    assert rows["squad"]["examples"] == 0 and rows["math_dataset"]["examples"] == 2500


def test_tasks_table_marks_missing_data(capsys):
    code, out, _ = run(["data", "tasks"], capsys)
    assert code == 0
    assert any(line.startswith("squad ") and line.endswith("no local data") for line in out.splitlines())
    assert "64 datasets (62 in the paper's count)" in out


def test_preview_renders_real_rows(capsys):
    code, out, _ = run(["data", "preview", "rte", "--template", "8", "--n", "2"], capsys)
    assert code == 0 and out.count("=== rte train row") == 2 and "turned around" in out
    code, out, _ = run(["data", "preview", "copa", "--n", "1"], capsys)
    assert "OPTIONS:\n- " in out and "--- options ---" in out


@pytest.mark.parametrize("argv, message", [
    (["data", "preview", "nope"], "unknown dataset 'nope'; known datasets:"),
    (["data", "preview", "squad"], "dataset squad has no local data"),
    (["data", "preview", "rte", "--template", "12"], "--template 12 out of range 0..9"),
])
def test_preview_errors_are_one_line(capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 1 and message in err


def test_mix_report(word_tokenizer):
    cfg = Config()
    cfg.data.mixture_cap, cfg.data.input_len, cfg.data.target_len = 50, 96, 32
    report = mix_report(cfg, word_tokenizer)
    assert report["excluded_clusters"] == ["nli", "paraphrase"]
    rates = {d["name"]: d["rate"] for d in report["datasets"]}
    assert sum(rates.values()) == pytest.approx(1, abs=1e-4)
    assert report["epoch_examples"] == sum(d["examples_per_epoch"] for d in report["datasets"])
    assert all(d["tokens"] > d["target_tokens"] > 0 for d in report["datasets"])
    assert report["packing_efficiency"] > 0.9
