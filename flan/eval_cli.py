"""The `flan eval`, `flan export-hf` and `flan import-hf` commands (registered by flan/cli.py).

    flan eval configs/tiny.toml --checkpoint runs/tiny-flan [--base auto|DIR|none] [--datasets rte,cb]
              [--clusters nli,commonsense] [--templates all|best|0,3] [--limit N] [--out DIR] [--eval.few_shot=3]
    flan eval configs/tiny.toml --hf path/to/llama-folder     # a transformers folder (temporary import)
    flan export-hf runs/tiny/checkpoints/step-000400 runs/tiny/hf
    flan import-hf path/to/llama-folder runs/llama

`--checkpoint` and `--base` take a run folder (its newest checkpoint) or a step-NNNNNN folder. Each model is
rebuilt from the config stored in its checkpoint and tokenizes with its own tokenizer; the CONFIG file
gives the [eval] and [data] settings and the kernels (engine.config.KERNEL_FIELDS). `--base auto` compares against the checkpoint the tuned run started
from (the exact step folder its run.json records as init_from), when it has one. Datasets default to the
clusters the checkpoint was tuned without (its run.json heldout_clusters; the config's held-out cluster when
it has no run.json); a cluster it was tuned on is refused unless --allow-seen, and then labelled "seen".
Per-example logs go to <out>/samples/<dataset>.jsonl (flan/samples.py) unless --no-samples.
scores.json records the provenance: each checkpoint's step folder, step, commit, config hash and held-out
clusters (flan/provenance.py), the code's commit and every eval setting.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from pathlib import Path

import torch

from engine.checkpoint import COMPLETE, latest_checkpoint, load_meta
from engine.config import Config, config_from_dict, load_config, resolve_auto, with_kernels
from engine.errors import UsageError


class CommandError(UsageError, ValueError):
    """A command-line argument that cannot be served; the message names it and the fix."""


def resolve_checkpoint(path: str | Path, flag: str) -> Path:
    """A step folder, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    step = latest_checkpoint(path) or path
    if not (step / COMPLETE).is_file():
        raise CommandError(f"{flag} {path}: neither a complete checkpoint folder (step-NNNNNN) nor a run "
                           "folder holding checkpoints/step-*; train one first or fix the path")
    return step


def eval_run_config(step_cfg: Config, cfg: Config) -> Config:
    """How a checkpoint runs here: its own model shape and tokenizer, the eval config's kernels, [parallel]
    layout and train.device, eval.precision as the autocast precision; every "auto" resolved for this device."""
    run = copy.deepcopy(step_cfg)
    run.model = with_kernels(step_cfg.model, cfg.model)
    run.parallel = copy.deepcopy(cfg.parallel)
    run.train.device, run.train.precision = cfg.train.device, cfg.eval.precision
    return resolve_auto(run.validate("flan eval (the checkpoint's config with the eval layout)"))


def load_layout(step_dir: Path, cfg: Config, mesh=None):
    """The checkpoint laid out for this rank (each rank reads only its slices of the weights), its tokenizer
    and stored config, and the mesh (made on the first call, then shared by every model scored)."""
    from engine.checkpoint import load_checkpoint
    from engine.model import build_model
    from engine.parallel import init_mesh, parallelize
    from engine.tokenizer import load_tokenizer

    step_cfg = config_from_dict(load_meta(step_dir)["config"], f"{step_dir} (its stored config)")
    run = eval_run_config(step_cfg, cfg)
    mesh = mesh or init_mesh(run)
    model = build_model(run.model, run.train.seed, device="cpu").eval()
    layout = parallelize(model.to(mesh.device), run, mesh)
    load_checkpoint(step_dir, layout, None)
    return layout, load_tokenizer(step_cfg), step_cfg, mesh


def _base_checkpoint(arg: str, tuned: dict, tuned_cfg: Config) -> Path | None:
    """--base: none, a folder, or auto = the exact step folder the tuned run loaded (its run.json init_from;
    the newest checkpoint of its train.init_from when the run left no run.json)."""
    if arg == "none":
        return None
    if arg != "auto":
        return resolve_checkpoint(arg, "--base")
    if tuned["init_from"]:
        return resolve_checkpoint(tuned["init_from"], f"--base auto ({tuned['run_json']} init_from)")
    start = tuned_cfg.train.init_from
    return resolve_checkpoint(start, "--base auto (the tuned run's train.init_from)") if start else None


def _progress(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {label}", unit="ex", dynamic_ncols=True)


def _default_clusters(tuned: dict, cfg: Config) -> list[str]:
    """The clusters the tuned checkpoint was tuned without (its run.json); the config's held-out cluster for a
    checkpoint with no tuning record."""
    from flan.registry import load_registry

    if tuned["kind"] == "tune" and tuned["heldout_clusters"]:
        return list(tuned["heldout_clusters"])
    heldout = cfg.data.heldout_cluster
    return load_registry().excluded_clusters(heldout) if heldout else []


def _check_seen(specs, seen: set[str] | None, allow_seen: bool) -> None:
    touched = sorted({s.cluster for s in specs} & (seen or set()))
    if touched and not allow_seen:
        raise CommandError(f"--datasets/--clusters: the checkpoint was tuned on cluster(s) {', '.join(touched)}, "
                           "so scoring them is not zero-shot; pass --allow-seen to score them anyway (labelled "
                           "'seen' in every report) or pick held-out clusters")
    if seen is None:
        print("flan eval: warning: the checkpoint has no run.json, so which clusters it was tuned on is unknown; "
              "scores.json records heldout_clusters as null", file=sys.stderr)


def cmd_eval(args) -> int:
    from engine.run_log import code_version, config_hash
    from flan.evaluate import default_split, evaluate_model, include_tasks, select_datasets
    from flan.provenance import checkpoint_info, seen_clusters
    from flan.loaders import data_dirs
    from flan.registry import load_registry
    from flan.report import summarize, write_report
    from flan.samples import write_samples

    cfg = load_config(args.config, args.overrides)
    if args.templates:
        cfg.eval.templates = args.templates
    if args.limit is not None:
        if args.limit < 0:
            raise CommandError(f"--limit {args.limit}: use 0 (all examples) or a positive count")
        cfg.eval.limit = args.limit
    data_dir = data_dirs(cfg)  # data.prepared_dir first, then data.data_dir
    registry = load_registry()
    if args.include:
        registry = include_tasks(registry, Path(args.include))
    if bool(args.hf) == bool(args.checkpoint):
        raise CommandError("give one of --checkpoint (a run or step folder) and --hf (a transformers folder)")
    if args.hf:  # a transformers folder: imported to a temporary checkpoint, then scored like any other
        import tempfile

        from engine.hf import import_hf

        scratch = tempfile.TemporaryDirectory(prefix="flan-eval-hf-")
        tuned_dir = import_hf(args.hf, Path(scratch.name) / "run", trust="json")
        args.base = "none" if args.base == "auto" else args.base
        args.out = args.out or str(Path("runs") / f"eval-{Path(args.hf).resolve().name}")
    else:
        tuned_dir = resolve_checkpoint(args.checkpoint, "--checkpoint")
    tuned = checkpoint_info(tuned_dir)
    tuned_cfg = config_from_dict(load_meta(tuned_dir)["config"], f"{tuned_dir} (its stored config)")
    models = [("tuned", tuned_dir, tuned)]
    base_dir = _base_checkpoint(args.base, tuned, tuned_cfg)
    if base_dir is not None:
        models.append(("base", base_dir, checkpoint_info(base_dir)))
    seen_lists = [seen_clusters(info, registry) for _, _, info in models]
    seen = None if any(s is None for s in seen_lists) else {c for s in seen_lists for c in s}
    specs, missing = select_datasets(registry, data_dir, datasets=args.datasets, clusters=args.clusters,
                                     default_clusters=_default_clusters(tuned, cfg))
    _check_seen(specs, seen, args.allow_seen)
    if missing:
        print(f"flan eval: no local validation data for {', '.join(missing)}; skipped", file=sys.stderr)
    split = args.split or default_split(cfg.eval.templates)
    rows, samples, mesh = [], (None if args.no_samples else []), None
    for label, step_dir, info in models:
        layout, tokenizer, step_cfg, mesh = load_layout(step_dir, cfg, mesh)
        if args.prompt and label == "tuned":  # a soft prompt belongs to the checkpoint it was tuned on
            from engine.prompt_tuning import attach_to_layout, load_prompt

            prompt, made = load_prompt(args.prompt)
            if made.get("checkpoint") and Path(made["checkpoint"]).resolve() != step_dir.resolve():
                print(f"flan eval: warning: --prompt was tuned on {made['checkpoint']}, not {step_dir}",
                      file=sys.stderr)
            attach_to_layout(layout, prompt.to(next(layout.model.parameters()).device))
        info["input_len"] = step_cfg.data.input_len  # prompts are cut to what the checkpoint was tuned with
        info["layout"], info["precision"] = layout.summary(), layout.cfg.train.precision
        if mesh.is_logging_rank:
            print(f"flan eval: {label} = {step_dir}", file=sys.stderr)
        rows += evaluate_model(layout, tokenizer, specs, cfg, data_dir=data_dir, templates=cfg.eval.templates,
                               label=label, input_len=step_cfg.data.input_len, split=split, samples=samples,
                               progress_factory=_progress if mesh.is_logging_rank else None)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not mesh.is_logging_rank:
        return 0
    for r in rows + (samples or []):
        r["seen"] = seen is not None and r["cluster"] in seen
    commit, dirty = code_version()
    provenance = {
        "models": {label: info for label, _, info in models},
        "code": {"commit": commit, "dirty": dirty},
        "eval_config": {"path": str(args.config), "overrides": list(args.overrides), "hash": config_hash(cfg),
                        "eval": dataclasses.asdict(cfg.eval), "parallel": dataclasses.asdict(cfg.parallel),
                        "bad_rows": cfg.data.bad_rows, "data_dir": str(data_dir)},
        "datasets": [s.name for s in specs], "skipped": missing, "include": args.include, "split": split,
        "clusters": list(dict.fromkeys(s.cluster for s in specs)),
        "seen_clusters": sorted(seen) if seen is not None else None, "allow_seen": args.allow_seen,
        "argv": sys.argv[1:],
    }
    out = Path(args.out) if args.out else Path(tuned_cfg.train.run_dir) / "eval"
    shots = f"{cfg.eval.few_shot}-shot" if cfg.eval.few_shot else "Zero-shot"
    clusters = ", ".join(f"{c} (seen)" if seen and c in seen else c for c in provenance["clusters"])
    paths = write_report(summarize(rows, split), out, title=f"{shots} evaluation ({clusters})", provenance=provenance)
    if samples is not None:
        write_samples(samples, out / "samples")
        paths["samples"] = out / "samples"
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

    step = import_hf(args.folder, args.out, dtype=args.dtype, layout=args.layout, trust=args.trust_tokenizer,
                     world=int(os.environ.get("WORLD_SIZE", "1")))  # under torchrun the ranks write it together
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank wrote its shards; one speaks
        print(f"{step}: imported; instruction-tune it with "
              f"`flan tune {Path(args.out) / 'config.toml'} --train.init_from={args.out}`")
    return 0


def _guarded(handler):
    """Refuse config overrides where the command takes none; flan/cli.py main() reports the errors."""
    def run(args) -> int:
        if handler is not cmd_eval and args.overrides:
            raise CommandError(f"{args.command} takes no --section.field overrides (got {args.overrides})")
        return handler(args)
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
    p.add_argument("--datasets", help="comma list of datasets (default: the clusters the checkpoint was tuned "
                                      "without, from its run.json)")
    p.add_argument("--clusters", help="comma list of clusters, e.g. nli,commonsense")
    p.add_argument("--templates", help="all, best (picked on the dev split), or indices like 0,3 "
                                       "(default: the config's eval.templates)")
    p.add_argument("--limit", type=int, help="validation examples per dataset, dev and test halves together")
    p.add_argument("--out", help="output folder (default: <tuned run>/eval)")
    p.add_argument("--prompt", help="soft prompt (prompt.safetensors from flan prompt-tune) for the --checkpoint "
                                    "model; the --base model runs without it")
    p.add_argument("--split", choices=("test", "dev", "all"),
                   help="rows reported: the seeded test half (the dev half picks --templates best), the dev half, "
                        "or all (default: all when --templates names indices, else test)")
    p.add_argument("--include", metavar="DIR",
                   help="also read task files from DIR/tasks and their templates from DIR/templates; a task's "
                        "data may then be a folder inside DIR")
    p.add_argument("--no-samples", action="store_true",
                   help="skip the per-example logs (<out>/samples/<dataset>.jsonl, written by default)")
    p.add_argument("--allow-seen", action="store_true",
                   help="score clusters the checkpoint was tuned on (labelled 'seen' in every report)")
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
