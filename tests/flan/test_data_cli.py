"""`flan data tasks | preview | mix` through the argparse hook flan/cli.py registers."""
import json

import pytest

from engine.config import Config
from flan.cli import main
from flan.data_cli import mix_report


def run(argv, capsys):
    code = main(argv)  # flan/cli.py main(): the one place errors become a line and an exit code
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


@pytest.mark.parametrize("argv, expected_code, message", [
    (["data", "preview", "nope"], 2, "unknown dataset 'nope'; known datasets:"),
    (["data", "preview", "squad"], 1, "dataset squad has no local data"),
    (["data", "preview", "rte", "--template", "12"], 2, "--template 12 out of range 0..9"),
])
def test_preview_errors_are_one_line(capsys, argv, expected_code, message):
    code, _, err = run(argv, capsys)
    assert code == expected_code and message in err


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
