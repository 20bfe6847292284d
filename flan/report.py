"""Evaluation reports: per-template score rows summarised, written as JSON, a markdown table and a plot.

    rows = summarize(rows)                        # adds template "mean" and "best" rows, and cluster rows
    write_report(rows, out_dir, title, provenance)  # scores.json, scores.md, heldout.png

A row whose cluster the model was tuned on carries seen=True (flan eval --allow-seen); every table row,
plot label and cluster average built from it says "(seen)".

Summaries, from the test-split rows of each (model, dataset, metric):
  template "mean"  the mean over templates; `spread` is their standard deviation (the template
                   sensitivity FLAN reports), stderr combines the per-template stderrs (sqrt(sum se^2) / T);
  template "best"  the template whose primary metric was highest on the dev split (`picked`), measured
                   on the test split (FLAN's dev-selected template);
  dataset "*"      per cluster: the mean over its datasets of their primary metric's template mean.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

ALL_DATASETS = "*"


def _group(rows, *keys):
    out = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per-template rows plus the mean, dev-best and per-cluster rows (see the module docstring)."""
    test = [r for r in rows if r["split"] == "test" and isinstance(r["template"], int)]
    dev = [r for r in rows if r["split"] == "dev" and r.get("primary")]
    out = list(rows)
    for (model, dataset, metric), group in _group(test, "model", "dataset", "metric").items():
        values = [r["value"] for r in group]
        base = {k: group[0][k] for k in ("model", "dataset", "cluster", "split", "metric", "primary")}
        base["seen"] = any(r.get("seen") for r in group)
        out.append(dict(base, template="mean", value=float(np.mean(values)), spread=float(np.std(values)),
                        n=group[0]["n"], templates=len(group),
                        stderr=math.sqrt(sum(r["stderr"] ** 2 for r in group)) / len(group)))
        picks = [r for r in dev if r["model"] == model and r["dataset"] == dataset]
        if picks:
            best = max(picks, key=lambda r: (r["value"], -r["template"]))["template"]
            chosen = [r for r in group if r["template"] == best]
            if chosen:
                out.append(dict(chosen[0], template="best", picked=best))
    means = [r for r in out if r["template"] == "mean" and r.get("primary")]
    for (model, cluster), group in _group(means, "model", "cluster").items():
        out.append({"model": model, "dataset": ALL_DATASETS, "cluster": cluster, "template": "mean", "split": "test",
                    "metric": "/".join(sorted({r["metric"] for r in group})), "primary": True,
                    "value": float(np.mean([r["value"] for r in group])), "n": sum(r["n"] for r in group),
                    "stderr": math.sqrt(sum(r["stderr"] ** 2 for r in group)) / len(group),
                    "datasets": sorted(r["dataset"] for r in group), "seen": any(r.get("seen") for r in group)})
    return out


def _seen(label: str, row: dict | None) -> str:
    """A name with " (seen)" when the model was tuned on it: scoring it was not zero-shot."""
    return f"{label} (seen)" if row and row.get("seen") else label


def _models(rows) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def markdown_table(rows: list[dict]) -> str:
    """Cluster averages, then every dataset and metric: mean +- spread over templates and the dev pick."""
    models = _models(rows)
    find = {(r["model"], r["dataset"], r["metric"], r["template"]): r for r in rows if r["split"] == "test"}
    lines = ["## Clusters (mean over datasets of the primary metric, templates averaged)", "",
             "| cluster | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    clusters = [r for r in rows if r["dataset"] == ALL_DATASETS]
    for (cluster, metric), _ in _group(clusters, "cluster", "metric").items():
        cells = [find.get((m, ALL_DATASETS, metric, "mean")) for m in models]
        lines.append(f"| {_seen(cluster, next(c for c in cells if c))} | {metric} | " + " | ".join(
            f"{c['value']:.1f} ± {c['stderr']:.1f}" if c else "–" for c in cells) + " |")
    lines += ["", "## Datasets (test split; mean ± spread over templates; best = template picked on dev)", "",
              "| dataset | cluster | metric | " + " | ".join(f"{m} mean | {m} best" for m in models) + " |",
              "|---|---|---|" + "---:|---:|" * len(models)]
    means = [r for r in rows if r["template"] == "mean" and r["dataset"] != ALL_DATASETS]
    for (dataset, cluster, metric), _ in _group(means, "dataset", "cluster", "metric").items():
        cells = []
        for m in models:
            mean, best = find.get((m, dataset, metric, "mean")), find.get((m, dataset, metric, "best"))
            cells.append(f"{mean['value']:.1f} ± {mean['spread']:.1f} ({mean['templates']}t, n={mean['n']})"
                         if mean else "–")
            cells.append(f"{best['value']:.1f} (t{best['picked']})" if best else "–")
        seen = next(r for r in means if (r["dataset"], r["metric"]) == (dataset, metric))
        lines.append(f"| {_seen(dataset, seen)} | {_seen(cluster, seen)} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heldout(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: each dataset's primary metric (template mean, spread as error bar), then cluster means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(rows)
    means = [r for r in rows if r["template"] == "mean" and r.get("primary") and r["split"] == "test"]

    def label(r):
        return _seen(r["dataset"] if r["dataset"] != ALL_DATASETS else f"{r['cluster']} (avg)", r)

    ordered = sorted(means, key=lambda r: (r["cluster"], r["dataset"] == ALL_DATASETS, r["dataset"]))
    labels = list(dict.fromkeys(label(r) for r in ordered))
    by = {(r["model"], label(r)): r for r in means}
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4))
    for k, m in enumerate(models):
        xs = np.arange(len(labels)) + k * width
        vals = [by[(m, lab)]["value"] if (m, lab) in by else np.nan for lab in labels]
        errs = [by[(m, lab)].get("spread", by[(m, lab)]["stderr"]) if (m, lab) in by else 0 for lab in labels]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(np.arange(len(labels)) + width * (len(models) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylabel("score (%; accuracy, F1, BLEU or ROUGE-L)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: str | Path, title: str = "Zero-shot evaluation",
                 provenance: dict | None = None) -> dict:
    """scores.json ({"provenance": what was scored and how, "rows": all rows}), scores.md and heldout.png under
    out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "scores.json", "markdown": out_dir / "scores.md", "plot": out_dir / "heldout.png"}
    paths["json"].write_text(json.dumps({"provenance": provenance or {}, "rows": rows}, indent=1))
    paths["markdown"].write_text(f"# {title}\n\n" + markdown_table(rows))
    plot_heldout(rows, paths["plot"], title)
    return paths
