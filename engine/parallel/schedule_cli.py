"""`flan pipeline-schedule`: every pipeline rank's timeline of a schedule, as text and as a PNG, with the bubble
fraction and the peak number of microbatches whose activations each stage holds.

    flan pipeline-schedule --pp 4 --microbatches 8 --schedule 1f1b
    flan pipeline-schedule --pp 4 --microbatches 8 --schedule interleaved --virtual-stages 2 --out sched.png

flan/cli.py registers it with `add_pipeline_commands(subparsers)`. The timeline comes from the simulator in
engine/parallel/schedules.py: a stage's forward of one microbatch takes one unit, its backward
--backward-ratio units (2 by default), a chunk of an interleaved stage 1/v of that.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.parallel.schedules import SCHEDULES, Timeline, bubble_formula, schedule_actions, simulate

CELL = 4  # characters per time slot in the text timeline


def timeline_text(timeline: Timeline, slot: float) -> list[str]:
    """One line per rank: each slot of `slot` time shows the action running ('F3', 'B3', 'F3b' for chunk 1 of
    an interleaved stage) or '.' when the rank idles."""
    width = round(timeline.makespan / slot)
    lines = []
    for rank, intervals in enumerate(timeline.intervals):
        cells = ["." * CELL] * width
        for start, end, action in intervals:
            label = f"{action.kind[0].upper()}{action.microbatch}{'abcdefgh'[action.chunk] if action.chunk else ''}"
            first, last = round(start / slot), round(end / slot)
            for i in range(first, last):
                cells[i] = (label if i == first else "-").ljust(CELL, "-" if i < last - 1 else " ")[:CELL]
        lines.append(f"rank {rank}: " + "".join(cells).rstrip())
    return lines


def save_plot(timeline: Timeline, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pp = len(timeline.intervals)
    fig, ax = plt.subplots(figsize=(max(8.0, timeline.makespan * 0.45), 0.6 * pp + 1.6))
    for rank, intervals in enumerate(timeline.intervals):
        for start, end, action in intervals:
            forward = action.kind == "forward"
            color = plt.get_cmap("Blues" if forward else "Greens")(0.45 + 0.2 * action.chunk)
            ax.broken_barh([(start, end - start)], (rank - 0.4, 0.8), facecolors=color, edgecolor="black", lw=0.5)
            ax.text((start + end) / 2, rank, str(action.microbatch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(pp), [f"rank {r} (peak {p})" for r, p in enumerate(timeline.peak_in_flight)])
    ax.invert_yaxis()
    ax.set_xlabel("time (one stage forward = 1)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_pipeline_schedule(args) -> int:
    try:
        programs = schedule_actions(args.schedule, args.pp, args.microbatches, args.virtual_stages)
    except ValueError as e:
        print(f"flan pipeline-schedule: {e}", file=sys.stderr)
        return 2
    v = args.virtual_stages
    timeline = simulate(programs, args.pp, v, forward_time=1.0, backward_time=args.backward_ratio)
    formula = bubble_formula(args.schedule, args.pp, args.microbatches, v)
    out = Path(args.out or f"runs/pipeline/{args.schedule}-pp{args.pp}-m{args.microbatches}-v{v}.png")
    title = (f"{args.schedule}, pp={args.pp}, microbatches={args.microbatches}, virtual stages={v}: bubble "
             f"{timeline.bubble_fraction:.3f} (formula {formula:.3f}), peak in flight {timeline.peak_in_flight}")
    save_plot(timeline, title, out)
    summary = {"schedule": args.schedule, "pp": args.pp, "microbatches": args.microbatches, "virtual_stages": v,
               "makespan": timeline.makespan, "bubble_fraction": timeline.bubble_fraction,
               "bubble_formula": formula, "bubble_per_rank": timeline.bubble,
               "peak_in_flight": timeline.peak_in_flight, "plot": str(out)}
    if args.json:
        print(json.dumps(summary))
        return 0
    # A slot is a chunk's forward; backwards span backward_ratio slots (rounded on odd ratios).
    print("\n".join(timeline_text(timeline, 1.0 / v)))
    print(f"bubble fraction {timeline.bubble_fraction:.4f} (formula {formula:.4f}); per rank "
          + ", ".join(f"{b:.3f}" for b in timeline.bubble))
    print("peak microbatches in flight per stage: " + ", ".join(map(str, timeline.peak_in_flight)))
    print(f"plot: {out}")
    return 0


def add_pipeline_commands(subparsers) -> None:
    """Register `flan pipeline-schedule` on the top-level subparsers of flan/cli.py."""
    p = subparsers.add_parser("pipeline-schedule", help="timeline, bubble and peak activations of a pipeline schedule")
    p.add_argument("--pp", type=int, required=True, help="pipeline stages (ranks)")
    p.add_argument("--microbatches", type=int, required=True, help="microbatches per optimizer step")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    p.add_argument("--virtual-stages", type=int, default=1, help="chunks per rank (interleaved schedule)")
    p.add_argument("--backward-ratio", type=float, default=2.0, help="backward time over forward time")
    p.add_argument("--out", default="", help="PNG path (default runs/pipeline/<schedule>-pp<P>-m<M>-v<V>.png)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the timeline")
    p.set_defaults(func=cmd_pipeline_schedule)
