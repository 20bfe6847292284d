"""An experiment's results: the eval steps' scores.json gathered into summary.json, summary.md and summary.png.

    rows = collect(steps)                     # one row per (eval step, model, cluster or dataset)
    diffs = differences(steps)                # one paired tuned-minus-base row per eval step that scored both
    write_summary(exp, folder, rows, diffs, records, command, meta)

Each row is a cluster's mean over its datasets (or, for steps that score named datasets, the dataset's primary
metric), templates averaged, on the split flan eval reports, with its stderr
(flan/stats.py: clustered by example, since every template scores the same examples; datasets independent).
Where a step scored the tuned model and its base, `differences` adds the "tuned - base" rows of scores.json:
the difference paired by example, and whether its 95% interval contains zero ("within noise"). Only such an
interval supports calling a difference an effect; two overlapping or separate bars do not pair.
The plot follows the definition's `plot`: "bars" (categories on x, one bar per group, as the paper's Figures
5, 8 and 10) or "curve" (a numeric x, one line per group, as Figures 6, 7 and 9); every interval shown, in
the tables and as error bars, is the 95% one, value +- 1.96 stderr.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flan.report import DIFFERENCE, interval_text, verdict
from flan.stats import Z95

ALL = "*"
INTERVAL_NOTE = ("± is the 95% interval (1.96 stderr, clustered by example over templates); a tuned-vs-base "
                 "difference is an effect only where its paired interval excludes zero")


def _summary_rows(step):
    """The primary template-mean rows of one eval step's scores.json (they exist for the split it reports
    only: test, or all with templates named by index), at the step's level (cluster means, or each
    dataset's row for per-dataset steps)."""
    path = step.folder / "scores.json"
    if step.kind != "eval" or not path.is_file():
        return
    for r in json.loads(path.read_text())["rows"]:
        if r["template"] == "mean" and r.get("primary") and (r["dataset"] == ALL) != step.per_dataset:
            yield r, (r["dataset"] if step.per_dataset else r["cluster"])


def collect(steps) -> list[dict]:
    """Summary rows of every eval step that has scores."""
    rows = []
    for step in steps:
        for r, where in _summary_rows(step):
            labels = step.labels.get(r["model"])
            if labels is None:
                continue
            rows.append({"step": step.name, "model": r["model"], "scored": where,
                         "x": labels["x"], "group": str(labels["group"]).format(cluster=where),
                         "metric": r["metric"], "value": r["value"], "stderr": r["stderr"], "n": r["n"]})
    return rows


def differences(steps) -> list[dict]:
    """The paired tuned-minus-base rows of every eval step that scored both (x as the tuned model's label)."""
    out = []
    for step in steps:
        for r, where in _summary_rows(step):
            if r["model"] != DIFFERENCE or "tuned" not in step.labels:
                continue
            out.append({"step": step.name, "scored": where, "x": step.labels["tuned"]["x"], "metric": r["metric"],
                        "value": r["value"], "stderr": r["stderr"], "n": r["n"],
                        "within_noise": bool(r["within_noise"])})
    return out


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


def markdown(exp: dict, rows: list[dict], diffs: list[dict], records: list[dict], command: str) -> str:
    groups = list(dict.fromkeys(r["group"] for r in rows))
    xs = list(dict.fromkeys(r["x"] for r in rows))
    by = {(r["x"], r["group"]): r for r in rows}
    lines = [f"# {exp['title']}", "", f"Paper: {exp['paper']}. Command: `{command}`", "",
             f"| {exp.get('x_label', 'x')} | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for x in xs:
        cells = [interval_text(by[(x, g)]) if (x, g) in by else "–" for g in groups]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    lines += ["", INTERVAL_NOTE]
    if diffs:
        lines += ["", "## Tuned minus base, paired by example", "",
                  "| step | scored | metric | difference | verdict |", "|---|---|---|---:|---|"]
        lines += [f"| {d['step']} | {d['scored']} | {d['metric']} | {interval_text(d)} | "
                  f"{verdict(d)} |"
                  for d in diffs]
    lines += ["", "## Steps", "", "| step | kind | reused | wall s |", "|---|---|---|---:|"]
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
            ax.errorbar(position, [r["value"] for _, r in pts], yerr=[Z95 * r["stderr"] for _, r in pts], marker="o",
                        capsize=3, label=g, linewidth=2.5 if g == "mean" else 1.2)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    else:
        width = 0.8 / max(len(groups), 1)
        for k, g in enumerate(groups):
            ax.bar(np.arange(len(xs)) + k * width, [by[(x, g)]["value"] if (x, g) in by else np.nan for x in xs],
                   width, yerr=[Z95 * by[(x, g)]["stderr"] if (x, g) in by else 0 for x in xs], capsize=3, label=g)
        ax.set_xticks(np.arange(len(xs)) + width * (len(groups) - 1) / 2, [str(x) for x in xs], rotation=20,
                      ha="right")
    ax.set_xlabel(exp.get("x_label", ""))
    ax.set_ylabel(exp.get("y_label", "zero-shot score (%; template mean, 95% interval)"))
    ax.set_title(exp["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(exp: dict, folder: Path, rows: list[dict], diffs: list[dict], records: list[dict], command: str,
                  meta: dict) -> dict:
    """summary.json, summary.md and summary.png in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if exp.get("mean_series"):
        rows = with_mean_series(rows)
    paths = {"json": folder / "summary.json", "markdown": folder / "summary.md", "plot": folder / "summary.png"}
    paths["json"].write_text(json.dumps({**meta, "experiment": exp["name"], "command": command, "rows": rows,
                                         "differences": diffs, "steps": records, "intervals": INTERVAL_NOTE}, indent=1))
    paths["markdown"].write_text(markdown(exp, rows, diffs, records, command))
    if rows:
        plot(exp, rows, paths["plot"])
    return paths
