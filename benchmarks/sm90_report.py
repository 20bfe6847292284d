"""Collect one gpu_suite.sh run into OUT/summary.md and OUT/summary.json.

    python -m benchmarks.sm90_report OUT

Reads OUT/steps.jsonl (one line per suite step: name, command, rc, seconds, written by the suite) and every
results JSON the steps wrote under OUT/<step>/ ({"meta", "rows"} from benchmarks/harness.py). Writes a
header with device, date, commit and the suite's command, the steps with their exit codes and times, our
attention's speed ratio against every peer measured (peer ms / our ms, above 1 = ours faster), and each
step's rows as a markdown table.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import commit

MAX_COLUMNS = 12


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (Triton interpreter)"


def attention_ratios(rows: list[dict]) -> list[dict]:
    """peer ms / triton ms per (pass, layout, D, S), for every peer with a time."""
    ours = {(r["pass"], r["layout"], r["D"], r["S"]): r["ms"] for r in rows
            if r.get("provider") == "triton" and r.get("ms")}
    out = []
    for r in rows:
        key = (r.get("pass"), r.get("layout"), r.get("D"), r.get("S"))
        if r.get("provider") not in (None, "triton") and r.get("ms") and key in ours:
            out.append(dict(zip(("pass", "layout", "D", "S"), key), peer=r["provider"],
                            ratio=round(r["ms"] / ours[key], 3)))
    return out


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no rows)"]
    columns = [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))][:MAX_COLUMNS]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])


def main(argv=None) -> None:
    out = Path((argv or sys.argv[1:])[0])
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    results = {str(p.relative_to(out)): json.loads(p.read_text())
               for p in sorted(out.glob("*/*.json"))}
    header = dict(device=device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit(),
                  command=(out / "command.txt").read_text().strip() if (out / "command.txt").exists() else "")
    lines = ["# GPU suite", "", *(f"- {k}: {v}" for k, v in header.items()), "",
             "Figures measured on the device above; on the CPU interpreter (smoke) they only show the suite runs.",
             "", "## Steps", "", *table(steps)]
    ratios = [r for name, res in results.items() if name.startswith("attention/")
              for r in attention_ratios(res["rows"])]
    if ratios:
        lines += ["", "## Attention: peer ms / our ms (above 1: ours faster)", "", *table(ratios)]
    for name, res in results.items():
        lines += ["", f"## {name}", "", *table(res["rows"])]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(dict(header, steps=steps, attention_ratios=ratios), indent=2) + "\n")
    print(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main()
