"""The `flan` command line.

    flan info configs/flan-137b.toml [--json]
    flan tokenizer train configs/tiny.toml
    flan pretrain configs/tiny.toml [--train.steps=100 ...]
    flan tune configs/tiny.toml --train.init_from=runs/tiny
    flan data tasks | preview DATASET | mix CONFIG
    flan eval configs/tiny.toml --checkpoint runs/tiny-flan [--clusters nli] [--limit N]
    flan export-hf CHECKPOINT OUT | import-hf DIR OUT
    flan plan configs/flan-137b.toml --gpus 256 --gpu-memory 80GiB
    flan checkpoint inspect DIR | convert DIR OUT --layout dp=1,pp=1,tp=1
    torchrun --nproc-per-node=2 -m flan pretrain configs/tiny.toml --parallel.tp=2

Any `--section.field=value` flag after the config overrides that field of the TOML file; `--debug` shows the
traceback of an error. Exit codes: 0 success, 1 runtime failure (damaged input, full disk, dead peer),
2 usage or config error, 130 interrupted (engine/errors.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import warnings

from engine.config import Config, ConfigError, load_config
from engine.errors import INTERRUPTED, RUNTIME, FlanError, os_error_message


def _config(args) -> Config:
    return load_config(args.config, args.overrides)


def cmd_info(args) -> int:
    from engine.info import model_info

    info = model_info(_config(args))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{'component':<24}{'parameters':>18}")
    for name, n in info["components"].items():
        print(f"{name:<24}{n:>18,}")
    print(f"{'blocks (all layers)':<24}{info['blocks_parameters']:>18,}  ({info['blocks_parameters'] / 1e9:.1f}B)")
    print(f"{'total':<24}{info['parameters']:>18,}  ({info['parameters'] / 1e9:.2f}B)")
    f = info["training_flops_per_token"]
    print(f"training FLOPs/token at seq_len {info['seq_len']}: {f['total']:.3e} "
          f"(dense {f['dense']:.3e} + attention {f['attention']:.3e})")
    return 0


def cmd_tokenizer_train(args) -> int:
    from engine.tokenizer import Tokenizer, train_tokenizer

    cfg = _config(args)
    path = train_tokenizer(cfg)
    print(f"{path} ({Tokenizer.load(path).vocab_size} pieces)")
    return 0


def cmd_pretrain(args) -> int:
    from engine.corpus import pretraining_source, unigram_entropy
    from engine.resume import preflight
    from engine.tokenizer import load_tokenizer
    from engine.train import train

    cfg = _config(args)
    preflight(cfg, "pretrain")  # before the tokenizer, which may train for minutes
    tokenizer = load_tokenizer(cfg)
    summary = train(cfg, pretraining_source(tokenizer), kind="pretrain")
    if "val_loss" in summary and not cfg.data.corpus:  # the unigram bar of the in-memory corpus
        summary["unigram_entropy"] = unigram_entropy(cfg, tokenizer)
    _print_summary(summary)
    return 0


def cmd_tune(args) -> int:
    from engine.data_source import RankSlice
    from engine.resume import preflight
    from engine.tokenizer import load_tokenizer
    from engine.train import train
    from flan.mixture import TuningStream
    from flan.registry import load_registry

    cfg = _config(args)
    preflight(cfg, "tune")  # before the tokenizer, which may train for minutes
    tokenizer = load_tokenizer(cfg)
    heldout, registry = cfg.data.heldout_cluster, load_registry()
    excluded = registry.excluded_clusters(heldout) if heldout else []
    if cfg.data.train_clusters:  # run.json lists every cluster the mixture leaves out
        from flan.mixture import eligible_tasks

        trained = {t.cluster for t in eligible_tasks(registry, heldout or None, cfg.data.train_clusters)}
        excluded = [c for c in registry.clusters if c not in trained]
    # The mixture packs global batches: each data-parallel rank takes its block of rows.
    _print_summary(train(cfg, lambda c, rank, size: RankSlice(TuningStream(c, tokenizer), rank, size), kind="tune",
                         heldout_clusters=excluded))
    return 0


def _print_summary(summary: dict) -> None:
    # The loop has ended the process group by now: torchrun's RANK says which process speaks.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (accepted anywhere)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("config", help="TOML config, e.g. configs/tiny.toml")
        return p

    p = with_config(sub.add_parser("info", help="parameters and FLOPs of a config (built on the meta device)"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command", required=True)
    with_config(tok.add_parser("train", help="train (or find cached) the SentencePiece model")).set_defaults(
        func=cmd_tokenizer_train)

    with_config(sub.add_parser("pretrain", help="pretrain on the corpus")).set_defaults(func=cmd_pretrain)
    with_config(sub.add_parser(
        "tune", help="instruction-tune on the FLAN mixture (start from --train.init_from=CHECKPOINT)")).set_defaults(
        func=cmd_tune)

    from engine.checkpoint_cli import add_checkpoint_commands
    from engine.memory_cli import add_memory_commands
    from engine.parallel.schedule_cli import add_pipeline_commands
    from engine.plan_cli import add_plan_commands
    from flan.data_cli import add_data_commands
    from flan.eval_cli import add_eval_commands
    from flan.experiment_cli import add_experiment_commands
    from flan.prompt_tune_cli import add_prompt_tune_commands

    add_data_commands(sub)
    add_eval_commands(sub)
    add_prompt_tune_commands(sub)
    add_experiment_commands(sub)
    add_plan_commands(sub)
    add_memory_commands(sub)
    add_checkpoint_commands(sub)
    add_pipeline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; the one place that turns expected errors into one line on stderr and an exit code
    (engine/errors.py: 2 usage or config, 1 runtime, 130 interrupted). `--debug` anywhere shows tracebacks."""
    if hasattr(signal, "SIGPIPE"):  # `flan data tasks | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides are written --section.field=value")
    args.overrides = rest
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _one_line_warning(args.command)
        try:
            return args.func(args)
        except Exception as e:
            if debug:
                raise
            code, message = _describe(e)
            print(f"flan {args.command}: {message}", file=sys.stderr, flush=True)
            return code
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"flan {args.command}: interrupted", file=sys.stderr)
            return INTERRUPTED


def _one_line_warning(command: str):
    """Warnings (rows skipped, an empty train split) as `flan COMMAND: warning: ...`, one line like the errors;
    --debug keeps Python's format, with the file and line that raised it."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"flan {command}: warning: {message}", file=file or sys.stderr, flush=True)
    return show


def _describe(e: Exception) -> tuple[int, str]:
    """(exit code, one line) for an error that escaped a command."""
    if isinstance(e, FlanError):
        kind = "config error" if isinstance(e, ConfigError) else "error"
        return e.exit_code, f"{kind}: {e}"
    if isinstance(e, OSError) and (e.filename is not None or e.errno is not None):
        return RUNTIME, f"error: {os_error_message(e)}"
    dist = sys.modules.get("torch.distributed")
    text = str(e).strip()
    # gloo reports a peer that died as a plain RuntimeError from its transport; NCCL and the store as DistError.
    if dist is not None and (isinstance(e, dist.DistError) or (
            isinstance(e, RuntimeError) and dist.is_initialized() and ("gloo" in text or "NCCL" in text))):
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(e).__name__)
        first = first.split(". This is typically")[0]
        return RUNTIME, (f"error: another rank stopped or stopped answering ({first}); see that rank's output for "
                         "the cause. Completed checkpoints are intact: continue with --train.resume=true")
    return RUNTIME, (f"internal error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); this is "
                     "a bug in flan-engine: rerun with --debug for the traceback and report it")


if __name__ == "__main__":
    sys.exit(main())
