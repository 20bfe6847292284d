"""Report summaries: template means with example-clustered intervals, the dev pick, cluster averages, tuned minus
base paired by example with a within-noise verdict, truncation counts, and one interval in table and plot."""
import json

import pytest

from flan.report import ALL_DATASETS, DIFFERENCE, summarize, write_report
from flan.stats import Z95


def row(model, dataset, template, split, per_example, metric="acc", cluster="nli"):
    return {"model": model, "dataset": dataset, "cluster": cluster, "template": template, "split": split,
            "metric": metric, "value": 100.0 * sum(per_example) / len(per_example), "n": len(per_example),
            "stderr": 1.0, "primary": True, "truncated": 1, "examples": list(range(len(per_example))),
            "per_example": list(per_example)}


ROWS = [row("tuned", "rte", 0, "test", [1, 0, 1, 1]), row("tuned", "rte", 1, "test", [1, 1, 0, 1]),
        row("tuned", "rte", 0, "dev", [1, 1]), row("tuned", "rte", 1, "dev", [0, 1]),
        row("tuned", "cb", 0, "test", [0, 1]),
        row("base", "rte", 0, "test", [0, 0, 1, 1]), row("base", "rte", 1, "test", [1, 0, 0, 1]),
        row("base", "cb", 0, "test", [0, 1]),
        row("tuned", "stsb", 0, "test", [0, 0, 0, 1], cluster="paraphrase"),
        row("base", "stsb", 0, "test", [0, 0, 0, 1], cluster="paraphrase")]


def _get(out, cluster="nli"):
    return {(r["model"], r["dataset"], r["template"]): r for r in out if r["split"] == "test" and r["cluster"] == cluster}


def test_mean_spread_dev_pick_and_cluster_average():
    get = _get(summarize(ROWS))
    mean = get[("tuned", "rte", "mean")]
    # example averages (1, .5, .5, 1): mean .75, std(ddof=1) = sqrt(1/12), stderr = sqrt(1/12) / 2
    assert mean["value"] == 75.0 and mean["spread"] == 0.0 and mean["stderr"] == pytest.approx(100 * (1 / 12) ** .5 / 2)
    assert mean["truncated"] == 2 and mean["requests"] == 8
    best = get[("tuned", "rte", "best")]
    assert best["picked"] == 0 and best["value"] == 75.0  # picked on dev, reported on test
    cluster = get[("tuned", ALL_DATASETS, "mean")]
    assert cluster["value"] == 62.5 and cluster["datasets"] == ["cb", "rte"]
    assert cluster["stderr"] == pytest.approx((mean["stderr"] ** 2 + get[("tuned", "cb", "mean")]["stderr"] ** 2)
                                              ** .5 / 2)


def test_paired_difference_and_within_noise():
    get = _get(summarize(ROWS))
    d = get[(DIFFERENCE, "rte", "mean")]
    # tuned - base per example: (1, .5, 0, 0) - (.5, 0, .5, 1) ... = (.5, .5, 0, 0): mean .25, stderr = sqrt(1/12)/2
    assert d["value"] == pytest.approx(25.0) and d["stderr"] == pytest.approx(100 * (1 / 12) ** .5 / 2)
    assert d["within_noise"]
    same = get[(DIFFERENCE, "cb", "mean")]
    assert same["value"] == 0.0 and same["stderr"] == 0.0
    assert get[(DIFFERENCE, ALL_DATASETS, "mean")]["value"] == pytest.approx(12.5)


def test_report_files_show_one_interval(tmp_path):
    out = summarize(ROWS)
    paths = write_report(out, tmp_path, provenance={"datasets": ["rte", "cb"]})
    saved = json.loads(paths["json"].read_text())
    assert saved["provenance"] == {"datasets": ["rte", "cb"]}
    assert not any("per_example" in r for r in saved["rows"])
    md = paths["markdown"].read_text()
    cluster = _get(out)[("tuned", ALL_DATASETS, "mean")]
    assert f"| nli | acc | 62.5 ± {Z95 * cluster['stderr']:.1f} |" in md
    assert "| rte | nli | acc | 25.0 ± " in md and "within noise" in md
    assert "| paraphrase | acc | 25.0 ± " in md  # each cluster's own average, not the last one's
    assert "tuned rte: 2 of 8 prompts" in md and paths["plot"].stat().st_size > 0


def test_bleu_means_use_a_bootstrap_over_shared_examples():
    def bleu(model, t, texts):
        return {"model": model, "dataset": "wmt", "cluster": "translation", "template": t, "split": "test",
                "metric": "bleu", "value": 10.0 * t, "n": 3, "stderr": 1.0, "primary": True, "examples": [0, 1, 2],
                "texts": texts, "references": ["a b c d", "e f g h", "i j k l"]}

    rows = [bleu("tuned", 0, ["a b c d", "e f g x", "i j y z"]), bleu("tuned", 1, ["a b c d", "e f g h", "z"]),
            bleu("base", 0, ["a b c d", "e f g x", "i j y z"]), bleu("base", 1, ["a b c d", "e f g h", "z"])]
    get = _get(summarize(rows), "translation")
    assert get[("tuned", "wmt", "mean")]["stderr"] > 0 and get[("tuned", "wmt", "mean")]["value"] == 5.0
    assert get[(DIFFERENCE, "wmt", "mean")]["stderr"] == 0.0  # same texts: every resample differs by zero
