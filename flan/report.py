"""Evaluation reports: per-template score rows summarised, written as JSON, a markdown table and a plot.

    rows = summarize(rows)                          # adds "mean", "best", cluster and tuned-minus-base rows
    write_report(rows, out_dir, title, provenance)  # scores.json, scores.md, heldout.png

A row whose cluster the model was tuned on carries seen=True (flan eval --allow-seen); every table row,
plot label and cluster average built from it says "(seen)".

Summaries, from the reported split's rows (test by default; dev or all) of each (model, dataset, metric):
  template "mean"  the mean over templates; `spread` is their standard deviation (the template
                   sensitivity FLAN reports); `stderr` is clustered by example, since every template
                   scores the same examples (flan/stats.py; corpus BLEU: a bootstrap over examples that
                   resamples every template alike); `truncated` counts the prompts cut to fit, of
                   `requests`;
  template "best"  the template whose primary metric was highest on the dev split (`picked`), measured
                   on the test split (FLAN's dev-selected template);
  dataset "*"      per cluster: the mean over its datasets of their primary metric's template mean
                   (datasets share no example: stderr sqrt(sum se^2) / D);
  model "tuned - base"  per dataset and metric, and per cluster: the difference of the template means,
                   paired by example, with `within_noise` when its 95% interval contains zero.
Every interval shown (tables and the plot's error bars) is the same 95% one: value +- 1.96 stderr.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from flan.stats import Estimate, bootstrap_stderr, mean_of_independent, paired_difference, template_mean

ALL_DATASETS = "*"
DIFFERENCE = "tuned - base"
PAIRED = ("tuned", "base")
PER_EXAMPLE_KEYS = ("examples", "per_example", "texts", "references")  # in memory only, not in scores.json


def _group(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _per_template(group: list[dict]) -> dict[int, dict[int, float]]:
    return {r["template"]: dict(zip(r["examples"], r["per_example"])) for r in group}


def _bleu_of_mean(groups: list[list[dict]], signs: list[float]) -> Estimate:
    """Corpus BLEU's template mean (or a signed sum of several models' means), its stderr by a bootstrap that
    resamples the examples alike for every template and model."""
    from flan.metrics import corpus_bleu

    order = groups[0][0]["examples"]
    if any(r["examples"] != order for g in groups for r in g):
        raise ValueError("corpus BLEU rows scored different examples; the bootstrap needs the same ones")

    def statistic(idx) -> float:
        return sum(sign * np.mean([corpus_bleu([r["texts"][i] for i in idx], [r["references"][i] for i in idx])
                                   for r in g]) for sign, g in zip(signs, groups))

    value = sum(sign * np.mean([r["value"] for r in g]) for sign, g in zip(signs, groups))
    return Estimate(float(value), bootstrap_stderr(statistic, len(order)), len(order))


def _mean_estimate(group: list[dict]) -> Estimate:
    if "per_example" in group[0]:
        return template_mean(_per_template(group))
    return _bleu_of_mean([group], [1.0])


def _difference(a: list[dict], b: list[dict]) -> Estimate:
    if "per_example" in a[0]:
        return paired_difference(_per_template(a), _per_template(b))
    return _bleu_of_mean([a, b], [1.0, -1.0])


def summarize(rows: list[dict], split: str = "test") -> list[dict]:
    """Per-template rows plus the mean, dev-best, per-cluster and paired rows (see the module docstring) of the
    reported split (test, dev or all); the dev pick only when the test split is reported."""
    test = [r for r in rows if r["split"] == split and isinstance(r["template"], int)]
    dev = [r for r in rows if r["split"] == "dev" and r.get("primary")] if split == "test" else []
    out = list(rows)
    groups = _group(test, "model", "dataset", "metric")
    for (model, dataset, metric), group in groups.items():
        base = {k: group[0][k] for k in ("model", "dataset", "cluster", "split", "metric", "primary")}
        base["seen"] = any(r.get("seen") for r in group)
        est = _mean_estimate(group)
        out.append(dict(base, template="mean", value=float(np.mean([r["value"] for r in group])),
                        spread=float(np.std([r["value"] for r in group])), n=est.n, templates=len(group),
                        stderr=est.stderr, truncated=sum(r.get("truncated", 0) for r in group),
                        unscored=group[0].get("unscored", 0), requests=sum(r["n"] for r in group)))
        picks = [r for r in dev if r["model"] == model and r["dataset"] == dataset]
        if picks:
            best = max(picks, key=lambda r: (r["value"], -r["template"]))["template"]
            chosen = [r for r in group if r["template"] == best]
            if chosen:
                out.append(dict(chosen[0], template="best", picked=best))
        if model == PAIRED[0] and (PAIRED[1], dataset, metric) in groups:
            d = _difference(group, groups[(PAIRED[1], dataset, metric)])
            out.append(dict(base, model=DIFFERENCE, template="mean", value=d.value, stderr=d.stderr, n=d.n,
                            within_noise=d.within_noise))
    means = [r for r in out if r["template"] == "mean" and r.get("primary")]
    for (model, cluster), group in _group(means, "model", "cluster").items():
        est = mean_of_independent([Estimate(r["value"], r["stderr"], r["n"]) for r in group])
        row = {"model": model, "dataset": ALL_DATASETS, "cluster": cluster, "template": "mean", "split": split,
               "metric": "/".join(sorted({r["metric"] for r in group})), "primary": True, "value": est.value,
               "n": est.n, "stderr": est.stderr, "datasets": sorted(r["dataset"] for r in group),
               "seen": any(r.get("seen") for r in group)}
        if model == DIFFERENCE:
            row["within_noise"] = est.within_noise
        out.append(row)
    return out


def _seen(label: str, row: dict | None) -> str:
    """A name with " (seen)" when the model was tuned on it: scoring it was not zero-shot."""
    return f"{label} (seen)" if row and row.get("seen") else label


def _models(rows) -> list[str]:
    return [m for m in dict.fromkeys(r["model"] for r in rows) if m != DIFFERENCE]


def interval_text(r: dict) -> str:
    """A row's value with its 95% interval, as every table writes it."""
    return f"{r['value']:.1f} ± {Estimate(r['value'], r['stderr'], r['n']).half_width:.1f}"


def verdict(r: dict) -> str:
    """A paired difference's reading: within noise, or which side is higher."""
    if r["within_noise"]:
        return "within noise"
    return "tuned higher" if r["value"] > 0 else "base higher"


def _reported(rows: list[dict]) -> str:
    """The split a summary reports (its mean rows')."""
    return next((r["split"] for r in rows if r["template"] == "mean"), "test")


def markdown_table(rows: list[dict]) -> str:
    """Cluster averages, every dataset and metric (mean, 95% interval, spread over templates, dev pick),
    tuned minus base paired by example, and the prompts cut to fit."""
    models, split = _models(rows), _reported(rows)
    find = {(r["model"], r["dataset"], r["metric"], r["template"]): r for r in rows if r["split"] == split}
    lines = ["Intervals: 95%, value ± 1.96 standard errors, clustered by example (every template scores the same "
             "examples).", "",
             "## Clusters (mean over datasets of the primary metric, templates averaged)", "",
             "| cluster | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    clusters = [r for r in rows if r["dataset"] == ALL_DATASETS and r["model"] != DIFFERENCE]
    by_cluster = {(r["model"], r["cluster"], r["metric"]): r for r in clusters if r["split"] == split}
    for (cluster, metric), group in _group(clusters, "cluster", "metric").items():
        cells = [by_cluster.get((m, cluster, metric)) for m in models]
        lines.append(f"| {_seen(cluster, group[0])} | {metric} | " + " | ".join(
            interval_text(c) if c else "–" for c in cells) + " |")
    lines += ["", f"## Datasets ({split} split; mean ± 95% interval, spread = std over templates; best = template "
              "picked on dev)", "",
              "| dataset | cluster | metric | " + " | ".join(f"{m} mean | {m} best" for m in models) + " |",
              "|---|---|---|" + "---:|---:|" * len(models)]
    means = [r for r in rows if r["template"] == "mean" and r["dataset"] != ALL_DATASETS and r["model"] != DIFFERENCE]
    for (dataset, cluster, metric), group in _group(means, "dataset", "cluster", "metric").items():
        cells = []
        for m in models:
            mean, best = find.get((m, dataset, metric, "mean")), find.get((m, dataset, metric, "best"))
            cells.append(f"{interval_text(mean)} (spread {mean['spread']:.1f}, {mean['templates']}t, n={mean['n']})"
                         if mean else "–")
            cells.append(f"{best['value']:.1f} (t{best['picked']})" if best else "–")
        lines.append(f"| {_seen(dataset, group[0])} | {_seen(cluster, group[0])} | {metric} | " + " | ".join(cells)
                     + " |")
    diffs = [r for r in rows if r["model"] == DIFFERENCE and r["split"] == split and r.get("primary")]
    if diffs:
        lines += ["", "## Tuned − base (primary metric, paired by example; clusters: mean over datasets)", "",
                  "| dataset | cluster | metric | difference ± 95% | verdict |", "|---|---|---|---:|---|"]
        for r in sorted(diffs, key=lambda r: (r["cluster"], r["dataset"] == ALL_DATASETS, r["dataset"])):
            name = "(cluster average)" if r["dataset"] == ALL_DATASETS else r["dataset"]
            lines.append(f"| {_seen(name, r)} | {_seen(r['cluster'], r)} | {r['metric']} | {interval_text(r)} | "
                         f"{verdict(r)} |")
    cut = [r for r in means if r.get("primary") and r.get("truncated")]
    lines += ["", "## Prompts cut to fit the model's input length", ""]
    lines += [f"- {r['model']} {r['dataset']}: {r['truncated']} of {r['requests']} prompts" for r in cut] or ["- none"]
    unscored = {r["dataset"]: r["unscored"] for r in means if r.get("primary") and r.get("unscored")}
    if unscored:
        lines += ["", "## Validation rows not scored (an option without text)", ""]
        lines += [f"- {dataset}: {n} rows" for dataset, n in sorted(unscored.items())]
    return "\n".join(lines) + "\n"


def plot_heldout(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: each dataset's primary metric (template mean, 95% interval as error bar, as in the
    tables), then cluster means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(rows)
    means = [r for r in rows if r["template"] == "mean" and r.get("primary") and r["split"] == _reported(rows)
             and r["model"] != DIFFERENCE]

    def label(r):
        return _seen(r["dataset"] if r["dataset"] != ALL_DATASETS else f"{r['cluster']} (avg)", r)

    ordered = sorted(means, key=lambda r: (r["cluster"], r["dataset"] == ALL_DATASETS, r["dataset"]))
    labels = list(dict.fromkeys(label(r) for r in ordered))
    by = {(r["model"], label(r)): r for r in means}
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4))
    for k, m in enumerate(models):
        xs = np.arange(len(labels)) + k * width
        got = [by.get((m, lab)) for lab in labels]
        vals = [r["value"] if r else np.nan for r in got]
        errs = [Estimate(r["value"], r["stderr"], r["n"]).half_width if r else 0 for r in got]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(np.arange(len(labels)) + width * (len(models) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylabel("score (%; accuracy, F1, BLEU or ROUGE-L), 95% interval")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str | Path, title: str = "Zero-shot evaluation",
                 provenance: dict | None = None) -> dict:
    """scores.json ({"provenance": what was scored and how, "rows": every row without its per-example values,
    which the samples files hold}), scores.md and heldout.png under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "scores.json", "markdown": out_dir / "scores.md", "plot": out_dir / "heldout.png"}
    kept = [{k: v for k, v in r.items() if k not in PER_EXAMPLE_KEYS} for r in rows]
    paths["json"].write_text(json.dumps({"provenance": provenance or {}, "rows": kept}, indent=1))
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(rows))
    plot_heldout(rows, paths["plot"], title)
    return paths
