"""The `flan eval`, `flan export-hf` and `flan import-hf` commands (registered by flan/cli.py).

    flan eval configs/tiny.toml --checkpoint runs/tiny-flan [--base auto|DIR|none] [--datasets rte,cb]
              [--clusters nli,commonsense] [--templates all|best|0,3] [--limit N] [--out DIR] [--eval.few_shot=3]
    flan eval configs/tiny.toml --hf path/to/llama-folder     # a transformers folder (temporary import)
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
    from engine.paths import shared_data_dir
    from engine.train import autocast
    from flan.evaluate import evaluate_model, select_datasets
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
    data_dir = shared_data_dir(cfg.data.data_dir or None)
    specs, missing = select_datasets(load_registry(), data_dir, datasets=args.datasets, clusters=args.clusters,
                                     default_cluster=cfg.data.heldout_cluster)
    if missing:
        print(f"flan eval: no local validation data for {', '.join(missing)}; skipped", file=sys.stderr)
    if bool(args.hf) == bool(args.checkpoint):
        raise CommandError("give one of --checkpoint (a run or step folder) and --hf (a transformers folder)")
    if args.hf:  # a transformers folder: imported to a temporary checkpoint, then scored like any other
        import tempfile

        from engine.hf import import_hf

        scratch = tempfile.TemporaryDirectory(prefix="flan-eval-hf-")
        tuned = import_hf(args.hf, Path(scratch.name) / "run", trust="json")
        args.base = "none" if args.base == "auto" else args.base
        args.out = args.out or str(Path("runs") / f"eval-{Path(args.hf).resolve().name}")
    else:
        tuned = resolve_checkpoint(args.checkpoint, "--checkpoint")
    models = [("tuned", tuned)]
    tuned_cfg = config_from_dict(load_meta(tuned)["config"], f"{tuned} (its stored config)")
    base = _base_checkpoint(args.base, tuned_cfg)
    if base is not None:
        models.append(("base", base))
    rows = []
    for label, step_dir in models:
        model, tokenizer, _ = load_model(step_dir, device)
        if args.prompt and label == "tuned":  # a soft prompt belongs to the checkpoint it was tuned on
            from engine.prompt_tuning import attach, load_prompt

            prompt, made = load_prompt(args.prompt)
            if made.get("checkpoint") and Path(made["checkpoint"]).resolve() != step_dir.resolve():
                print(f"flan eval: warning: --prompt was tuned on {made['checkpoint']}, not {step_dir}",
                      file=sys.stderr)
            attach(model, prompt.to(device))
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

    out = export_hf(resolve_checkpoint(args.checkpoint, "CHECKPOINT"), args.out, force=args.force)
    print(f"{out}: Llama-format folder (config.json, model.safetensors, tokenizer); "
          "load it with transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def cmd_import_hf(args) -> int:
    from engine.hf import import_hf

    step = import_hf(args.folder, args.out, dtype=args.dtype, layout=args.layout, trust=args.trust_tokenizer)
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
    from engine.checkpoint_cli import parse_layout

    p = subparsers.add_parser("eval", help="zero-shot evaluation of a checkpoint (tuned against its base)")
    p.add_argument("config", help="TOML config whose [eval] and [data] sections apply, e.g. configs/tiny.toml")
    p.add_argument("--checkpoint", help="run folder (newest checkpoint) or step-NNNNNN folder")
    p.add_argument("--hf", help="a transformers Llama folder to score instead (imported to a temporary checkpoint, "
                   "tokenized as transformers does); the report goes to runs/eval-<folder name> unless --out")
    p.add_argument("--base", default="auto",
                   help="second model side by side: auto (the tuned run's train.init_from), none, or a folder")
    p.add_argument("--datasets", help="comma list of datasets (default: the config's held-out cluster)")
    p.add_argument("--clusters", help="comma list of clusters, e.g. nli,commonsense")
    p.add_argument("--templates", help="all, best (picked on the dev split), or indices like 0,3 "
                                       "(default: the config's eval.templates)")
    p.add_argument("--limit", type=int, help="validation examples per dataset, dev and test halves together")
    p.add_argument("--out", help="output folder (default: <tuned run>/eval)")
    p.add_argument("--prompt", help="soft prompt (prompt.safetensors from flan prompt-tune) for the --checkpoint "
                                    "model; the --base model runs without it")
    p.set_defaults(func=_guarded(cmd_eval))

    p = subparsers.add_parser("export-hf", help="write a checkpoint as a transformers Llama folder")
    p.add_argument("checkpoint", help="run folder or step-NNNNNN folder")
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="replace the model files of a non-empty OUT")
    p.set_defaults(func=_guarded(cmd_export_hf))

    p = subparsers.add_parser("import-hf", help="bring a Llama-architecture transformers folder in as a checkpoint")
    p.add_argument("folder", help="folder with config.json, *.safetensors and tokenizer.json or tokenizer.model")
    p.add_argument("out", help="new run folder (the checkpoint lands in OUT/checkpoints/step-000000)")
    p.add_argument("--dtype", default="float32", help="stored dtype: float32, bfloat16 or float16")
    p.add_argument("--layout", type=parse_layout, default=None, help="write this layout's shards, e.g. dp=1,pp=1,tp=2")
    p.add_argument("--trust-tokenizer", default="auto", help="auto, or json/model: the file to use when the "
                   "folder's tokenizer.json and tokenizer.model disagree")
    p.set_defaults(func=_guarded(cmd_import_hf))
