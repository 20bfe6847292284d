"""An experiment's results: the eval steps' scores.json gathered into summary.json, summary.md and summary.png.

    rows = collect(steps)                     # one row per (eval step, model, cluster or dataset)
    write_summary(exp, ctx, steps, records, rows)

Each row is a cluster's mean over its datasets (or, for steps that score named datasets, the dataset's primary
metric), templates averaged, on the test half of the validation split, with the stderr that flan eval reports.
Intervals: the paired bootstrap intervals of the evaluation issue (flan/stats.py) are not on main yet, so the
table shows the unpaired stderr from scores.json, and says so; no difference is called an effect here.
The plot follows the definition's `plot`: "bars" (categories on x, one bar per group, as the paper's Figures
5, 8 and 10) or "curve" (a numeric x, one line per group, as Figures 6, 7 and 9), error bars = stderr.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ALL = "*"
INTERVAL_NOTE = ("± is the unpaired stderr from each scores.json (paired intervals come with flan/stats.py, "
                 "issue 16, not yet on main); at this scale differences inside it are noise")


def collect(steps) -> list[dict]:
    """Summary rows of every eval step that has scores."""
    rows = []
    for step in steps:
        path = step.folder / "scores.json"
        if step.kind != "eval" or not path.is_file():
            continue
        for r in json.loads(path.read_text()):
            if r["split"] != "test" or r["template"] != "mean" or not r.get("primary"):
                continue
            if (r["dataset"] == ALL) == step.per_dataset:
                continue  # cluster means, or each dataset's row for per-dataset steps
            labels = step.labels.get(r["model"])
            if labels is None:
                continue
            where = r["dataset"] if step.per_dataset else r["cluster"]
            rows.append({"step": step.name, "model": r["model"], "scored": where,
                         "x": labels["x"], "group": str(labels["group"]).format(cluster=where),
                         "metric": r["metric"], "value": r["value"], "stderr": r["stderr"], "n": r["n"]})
    return rows


def with_mean_series(rows: list[dict]) -> list[dict]:
    """Add the "mean" group: at every x, the mean over the groups there (the paper's average curve)."""
    out = list(rows)
    for x in dict.fromkeys(r["x"] for r in rows):
        at = [r for r in rows if r["x"] == x]
        if len(at) > 1:
            out.append({"step": "mean", "model": "tuned", "scored": "mean", "x": x, "group": "mean",
                        "metric": "/".join(sorted({r["metric"] for r in at})),
                        "value": float(np.mean([r["value"] for r in at])),
                        "stderr": float(np.sqrt(sum(r["stderr"] ** 2 for r in at)) / len(at)),
                        "n": sum(r["n"] for r in at)})
    return out


def markdown(exp: dict, rows: list[dict], records: list[dict], command: str) -> str:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    xs = list(dict.fromkeys(r["x"] for r in rows))
    by = {(r["x"], r["group"]): r for r in rows}
    lines = [f"# {exp['title']}", "", f"Paper: {exp['paper']}. Command: `{command}`", "",
             f"| {exp.get('x_label', 'x')} | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for x in xs:
        cells = [f"{by[(x, g)]['value']:.1f} ± {by[(x, g)]['stderr']:.1f}" if (x, g) in by else "–" for g in groups]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    lines += ["", INTERVAL_NOTE, "", "## Steps", "", "| step | kind | reused | wall s |", "|---|---|---|---:|"]
    lines += [f"| {r['name']} | {r['kind']} | {'yes' if r['reused'] else 'no'} | {r['wall_s']:.1f} |"
              for r in records]
    return "\n".join(lines) + "\n"


def plot(exp: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in rows))
    xs = list(dict.fromkeys(r["x"] for r in rows))
    by = {(r["x"], r["group"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(xs) + 3), 4))
    if exp["plot"] == "curve":
        for g in groups:
            pts = [(x, by[(x, g)]) for x in xs if (x, g) in by]
            position = [xs.index(x) for x, _ in pts]
            ax.errorbar(position, [r["value"] for _, r in pts], yerr=[r["stderr"] for _, r in pts], marker="o",
                        capsize=3, label=g, linewidth=2.5 if g == "mean" else 1.2)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    else:
        width = 0.8 / max(len(groups), 1)
        for k, g in enumerate(groups):
            ax.bar(np.arange(len(xs)) + k * width, [by[(x, g)]["value"] if (x, g) in by else np.nan for x in xs],
                   width, yerr=[by[(x, g)]["stderr"] if (x, g) in by else 0 for x in xs], capsize=3, label=g)
        ax.set_xticks(np.arange(len(xs)) + width * (len(groups) - 1) / 2, [str(x) for x in xs], rotation=20,
                      ha="right")
    ax.set_xlabel(exp.get("x_label", ""))
    ax.set_ylabel(exp.get("y_label", "zero-shot score (%; template mean, ± stderr)"))
    ax.set_title(exp["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(exp: dict, folder: Path, rows: list[dict], records: list[dict], command: str,
                  meta: dict) -> dict:
    """summary.json, summary.md and summary.png in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if exp.get("mean_series"):
        rows = with_mean_series(rows)
    paths = {"json": folder / "summary.json", "markdown": folder / "summary.md", "plot": folder / "summary.png"}
    paths["json"].write_text(json.dumps({**meta, "experiment": exp["name"], "command": command, "rows": rows,
                                         "steps": records, "intervals": INTERVAL_NOTE}, indent=1))
    paths["markdown"].write_text(markdown(exp, rows, records, command))
    if rows:
        plot(exp, rows, paths["plot"])
    return paths
