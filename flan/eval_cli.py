"""The `flan eval`, `flan export-hf` and `flan import-hf` commands (registered by flan/cli.py).

    flan eval configs/tiny.toml --checkpoint runs/tiny-flan [--base auto|DIR|none] [--datasets rte,cb]
              [--clusters nli,commonsense] [--templates all|best|0,3] [--limit N] [--out DIR] [--eval.few_shot=3]
    flan export-hf runs/tiny/checkpoints/step-000400 runs/tiny/hf
    flan import-hf path/to/llama-folder runs/llama

`--checkpoint` and `--base` take a run folder (its newest checkpoint) or a step-NNNNNN folder. Each model is
rebuilt from the config stored in its checkpoint and tokenizes with its own tokenizer; the CONFIG file
gives the [eval] and [data] settings. `--base auto` compares against the checkpoint the tuned run started
from (its train.init_from), when it has one. Datasets default to the config's held-out cluster.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine.checkpoint import COMPLETE, CheckpointError, apply_model_state, latest_checkpoint, load_meta, load_model_state
from engine.config import Config, config_from_dict, load_config


class CommandError(ValueError):
    """A command-line argument that cannot be served; the message names it and the fix."""


def resolve_checkpoint(path: str | Path, flag: str) -> Path:
    """A step folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    step = latest_checkpoint(path) or path
    if not (step / COMPLETE).is_file():
        raise CommandError(f"{flag} {path}: neither a complete checkpoint folder (step-NNNNNN) nor a run "
                           "folder holding checkpoints/step-*; train one first or fix the path")
    return step


def load_model(step_dir: Path, device: torch.device):
    """The model and tokenizer of a checkpoint, from the config it was saved with."""
    from engine.model import build_model
    from engine.tokenizer import load_tokenizer

    cfg = config_from_dict(load_meta(step_dir)["config"], f"{step_dir} (its stored config)")
    model = build_model(cfg.model, cfg.train.seed)
    apply_model_state(model, load_model_state(step_dir), step_dir)
    return model.to(device).eval(), load_tokenizer(cfg), cfg


def _base_checkpoint(arg: str, tuned_cfg: Config) -> Path | None:
    if arg == "none":
        return None
    if arg == "auto":
        start = tuned_cfg.train.init_from
        return resolve_checkpoint(start, "--base auto (the tuned run's train.init_from)") if start else None
    return resolve_checkpoint(arg, "--base")


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {label}", unit="ex", dynamic_ncols=True)


def cmd_eval(args) -> int:
    from engine.train import autocast
    from flan.evaluate import evaluate_model, select_datasets
    from flan.loaders import data_dirs
    from flan.registry import load_registry
    from flan.report import summarize, write_report

    cfg = load_config(args.config, args.overrides)
    if args.templates:
        cfg.eval.templates = args.templates
    if args.limit is not None:
        if args.limit < 0:
            raise CommandError(f"--limit {args.limit}: use 0 (all examples) or a positive count")
        cfg.eval.limit = args.limit
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    data_dir = data_dirs(cfg)  # data.prepared_dir first, then data.data_dir
    specs, missing = select_datasets(load_registry(), data_dir, datasets=args.datasets, clusters=args.clusters,
                                     default_cluster=cfg.data.heldout_cluster)
    if missing:
        print(f"flan eval: no local validation data for {', '.join(missing)}; skipped", file=sys.stderr)
    tuned = resolve_checkpoint(args.checkpoint, "--checkpoint")
    models = [("tuned", tuned)]
    tuned_cfg = config_from_dict(load_meta(tuned)["config"], f"{tuned} (its stored config)")
    base = _base_checkpoint(args.base, tuned_cfg)
    if base is not None:
        models.append(("base", base))
    rows = []
    for label, step_dir in models:
        model, tokenizer, _ = load_model(step_dir, device)
        print(f"flan eval: {label} = {step_dir}", file=sys.stderr)
        with autocast(cfg, device):
            rows += evaluate_model(model, tokenizer, specs, cfg, data_dir=data_dir, templates=cfg.eval.templates,
                                   label=label, progress_factory=_progress)
    out = Path(args.out) if args.out else Path(tuned_cfg.train.run_dir) / "eval"
    shots = f"{cfg.eval.few_shot}-shot" if cfg.eval.few_shot else "Zero-shot"
    clusters = ", ".join(dict.fromkeys(s.cluster for s in specs))
    paths = write_report(summarize(rows), out, title=f"{shots} evaluation ({clusters})")
    print(paths["markdown"].read_text())
    print("\n".join(f"{kind}: {p}" for kind, p in paths.items()))
    return 0


def cmd_export_hf(args) -> int:
    from engine.hf import export_hf

    out = export_hf(resolve_checkpoint(args.checkpoint, "CHECKPOINT"), args.out)
    print(f"{out}: Llama-format folder (config.json, model.safetensors, tokenizer); "
          "load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def cmd_import_hf(args) -> int:
    from engine.hf import import_hf

    step = import_hf(args.folder, args.out)
    print(f"{step}: imported; instruction-tune it with "
          f"`flan tune {Path(args.out) / 'config.toml'} --train.init_from={args.out}`")
    return 0


def _guarded(handler):
    """Turn the errors that describe a bad argument or input into one message and exit status 2."""
    from engine.hf import HFError
    from flan.evaluate import EvalError
    from flan.loaders import DataError
    from flan.registry import RegistryError
    from flan.templates import TemplateError

    def run(args) -> int:
        try:
            if handler is not cmd_eval and args.overrides:
                raise CommandError(f"{args.command} takes no --section.field overrides (got {args.overrides})")
            return handler(args)
        except (CommandError, CheckpointError, HFError, EvalError, DataError, RegistryError, TemplateError,
                FileNotFoundError) as e:
            print(f"flan {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def add_eval_commands(subparsers) -> None:
    """Register eval, export-hf and import-hf on the `flan` parser's subparsers."""
    p = subparsers.add_parser("eval", help="zero-shot evaluation of a checkpoint (tuned against its base)")
    p.add_argument("config", help="TOML config whose [eval] and [data] sections apply, e.g. configs/tiny.toml")
    p.add_argument("--checkpoint", required=True, help="run folder (newest checkpoint) or step-NNNNNN folder")
    p.add_argument("--base", default="auto",
                   help="second model side by side: auto (the tuned run's train.init_from), none, or a folder")
    p.add_argument("--datasets", help="comma list of datasets (default: the config's held-out cluster)")
    p.add_argument("--clusters", help="comma list of clusters, e.g. nli,commonsense")
    p.add_argument("--templates", help="all, best (picked on the dev split), or indices like 0,3 "
                                       "(default: the config's eval.templates)")
    p.add_argument("--limit", type=int, help="validation examples per dataset, dev and test halves together")
    p.add_argument("--out", help="output folder (default: <tuned run>/eval)")
    p.set_defaults(func=_guarded(cmd_eval))

    p = subparsers.add_parser("export-hf", help="write a checkpoint as a transformers Llama folder")
    p.add_argument("checkpoint", help="run folder or step-NNNNNN folder")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=_guarded(cmd_export_hf))

    p = subparsers.add_parser("import-hf", help="bring a Llama-architecture transformers folder in as a checkpoint")
    p.add_argument("folder", help="folder with config.json, *.safetensors and tokenizer.model")
    p.add_argument("out", help="run folder to create (the checkpoint lands in OUT/checkpoints/step-000000)")
    p.set_defaults(func=_guarded(cmd_import_hf))
