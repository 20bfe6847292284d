"""The `flan experiment` commands: list the paper's experiments, run one end to end (flan/experiments.py).

    flan experiment list
    flan experiment run few_shot [configs/tiny.toml] [--scale smoke|tiny|<preset>] [--out runs/experiments/smoke]
                        [--set shots=[0,8]] [--set 'sizes=[{name="125m", preset="configs/gpu-125m.toml"}]'] [--dry-run]

`run` executes the experiment's steps in order, each the `flan` command it names (printed before it runs),
skipping finished ones, and writes OUT/<name>/summary.{json,md,png}. --scale smoke shrinks every step to a
1-layer model, two steps and four examples (CI); tiny runs CONFIG as written (default configs/tiny.toml); any
other scale runs configs/<scale>.toml when CONFIG is not given. OUT defaults to runs/experiments/<scale>.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from engine.config import ConfigError

STEP_FILE = "step.json"


def step_state(step) -> str:
    """"done", "resume" (a training folder with checkpoints), or "new"; a step.json of another command stops."""
    from engine.checkpoint import latest_checkpoint

    marker = step.folder / STEP_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text())["argv"]
        if recorded != list(step.argv):
            raise ConfigError(f"--out: {step.folder} holds step {step.name} made by `flan {shlex.join(recorded)}`, "
                              "not this command; choose another --out to keep both")
        return "done"
    if step.kind in ("pretrain", "tune") and latest_checkpoint(step.folder) is not None:
        return "resume"
    return "new"


def run_steps(steps) -> tuple[list[dict], int]:
    """Run every unfinished step through flan's own main(); the records and 0, or the failing step's status."""
    from engine.run_log import code_version
    from flan.cli import main

    records = []
    for step in steps:
        state = step_state(step)
        if state == "done":
            records.append({**json.loads((step.folder / STEP_FILE).read_text()), "reused": True})
            continue
        argv = list(step.argv) + (["--train.resume=true"] if state == "resume" else [])
        print(f"flan experiment: [{step.name}] flan {shlex.join(argv)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        code = main(argv)
        if code:
            print(f"flan experiment: step {step.name} failed (exit {code}); fix it and re-run to continue",
                  file=sys.stderr)
            return records, code
        commit, dirty = code_version()
        record = {"name": step.name, "kind": step.kind, "argv": list(step.argv),
                  "wall_s": time.perf_counter() - started, "commit": commit, "dirty": dirty}
        step.folder.mkdir(parents=True, exist_ok=True)
        (step.folder / STEP_FILE).write_text(json.dumps(record, indent=1))
        records.append({**record, "reused": False})
    return records, 0


def cmd_list(args) -> int:
    from flan.experiments import list_experiments

    for exp in list_experiments():
        print(f"{exp['name']:<18} {exp['title']}  ({exp['paper']})")
    return 0


def resolve_config(config: str | None, scale: str) -> str:
    if config:
        return config
    if scale in ("smoke", "tiny"):
        return "configs/tiny.toml"
    path = Path("configs") / f"{scale}.toml"
    if not path.is_file():
        raise ConfigError(f"--scale {scale}: no {path}; use smoke, tiny, a preset under configs/, or give CONFIG")
    return str(path)


def cmd_run(args) -> int:
    from engine.paths import shared_data_dir
    from flan.experiment_report import collect, differences, write_summary
    from flan.experiments import Context, expand, load_experiment, with_settings

    if args.overrides:
        raise ConfigError(f"flan experiment run takes no --section.field overrides (got {args.overrides}); put "
                          "them in CONFIG")
    exp = with_settings(load_experiment(args.name), args.set or [])
    config = resolve_config(args.config, args.scale)
    out = Path(args.out or f"runs/experiments/{args.scale}")
    ctx = Context(config, args.scale, out)
    steps = expand(exp, ctx, data_dir=shared_data_dir())
    if args.dry_run:
        for step in steps:
            print(f"[{step.name}] {step_state(step)}: flan {shlex.join(step.argv)}")
        return 0
    started = time.perf_counter()
    records, code = run_steps(steps)
    command = shlex.join(["flan", "experiment", "run", args.name, config, "--scale", args.scale, "--out", str(out),
                          *(f"--set={item}" for item in args.set or [])])
    paths = write_summary(exp, out / exp["name"], collect(steps), differences(steps), records,
                          command,
                          {"scale": args.scale, "config": config, "wall_s": time.perf_counter() - started,
                           "finished": code == 0})
    print(paths["markdown"].read_text())
    print("\n".join(f"{kind}: {p}" for kind, p in paths.items()))
    return code


def add_experiment_commands(subparsers) -> None:
    """Register `flan experiment list|run` on the `flan` parser's subparsers."""
    p = subparsers.add_parser("experiment", help="the FLAN paper's experiments, one command each")
    sub = p.add_subparsers(dest="experiment_command", required=True)
    sub.add_parser("list", help="the experiments under configs/experiments/").set_defaults(func=cmd_list)
    r = sub.add_parser("run", help="run one experiment end to end (finished steps are reused)")
    r.add_argument("name", help="experiment name (see `flan experiment list`)")
    r.add_argument("config", nargs="?", help="base TOML config (default: configs/tiny.toml, or configs/<scale>.toml)")
    r.add_argument("--scale", default="tiny", help="smoke (CI: a few steps), tiny, or a preset name under configs/")
    r.add_argument("--out", help="output root (default runs/experiments/<scale>); shared runs go in OUT/runs")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a definition key with a TOML value, e.g. --set shots=[0,8] or "
                        "--set 'sizes=[{name=\"125m\", preset=\"configs/gpu-125m.toml\"}]' (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print each step's state (done, resume, new) and command")
    r.set_defaults(func=cmd_run)
