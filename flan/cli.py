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

Any `--section.field=value` flag after the config overrides that field of the TOML file.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from engine.config import Config, ConfigError, load_config


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
    from engine.corpus import CorpusStream, unigram_entropy
    from engine.data_source import RankSlice
    from engine.tokenizer import load_tokenizer
    from engine.train import train

    cfg = _config(args)
    tokenizer = load_tokenizer(cfg)
    # The in-memory corpus yields global batches: each data-parallel rank takes its block of rows.
    summary = train(cfg, lambda c, rank, size: RankSlice(CorpusStream(c, tokenizer), rank, size), kind="pretrain")
    if "val_loss" in summary:
        summary["unigram_entropy"] = unigram_entropy(cfg, tokenizer)
    _print_summary(summary)
    return 0


def cmd_tune(args) -> int:
    from engine.data_source import RankSlice
    from engine.tokenizer import load_tokenizer
    from engine.train import train
    from flan.mixture import TuningStream
    from flan.registry import load_registry

    cfg = _config(args)
    tokenizer = load_tokenizer(cfg)
    heldout = cfg.data.heldout_cluster
    excluded = load_registry().excluded_clusters(heldout) if heldout else []
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

    add_data_commands(sub)
    add_eval_commands(sub)
    add_plan_commands(sub)
    add_memory_commands(sub)
    add_checkpoint_commands(sub)
    add_pipeline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `flan data tasks | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides are written --section.field=value")
    args.overrides = rest
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"flan: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
