"""The `flan data ...` commands: list the datasets, preview rendered prompts, inspect a mixture.

    flan data tasks [--json]                          # every dataset: cluster, kind, templates, local examples
    flan data preview rte [--template 3] [--n 2]      # rendered prompts and targets of real rows
    flan data mix configs/tiny.toml [--json]          # rates, examples, tokens per dataset, packing efficiency
    flan data prepare cb [--from DIR] [--out DIR] [--max-rows N]   # public data -> data.prepared_dir (flan/prepare.py)
    flan data prepare --all --from DIR

Prepared datasets land in data.prepared_dir ("data" in the working directory unless --out or the flag says
otherwise) and every reader (preview, mix, tune, eval) looks there before data.data_dir: a prepared dataset
replaces its sample, whole.

flan/cli.py registers them with `add_data_commands(subparsers)`; each handler takes the parsed args
(with `args.overrides`, the `--section.field=value` flags) and returns an exit code.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

from engine.config import load_config
from pathlib import Path

from engine.errors import USAGE
from flan.loaders import SPLITS, DataError, count_examples, data_dirs, has_split, load_split
from flan.registry import load_registry
from flan.templates import TemplateError, load_templates, render_template


def _config(args):
    return load_config(getattr(args, "config", None), args.overrides)


def task_listing(cfg) -> list[dict]:
    """One dict per registry dataset: the JSON of `flan data tasks` plus per-split counts."""
    data_dir = data_dirs(cfg, required=False)  # listing works without any data folder
    out = []
    for spec in load_registry().tasks.values():
        splits = {s: count_examples(spec, s, data_dir) for s in SPLITS}
        out.append({"name": spec.name, "cluster": spec.cluster, "kind": spec.kind,
                    "templates": len(load_templates(spec)), "examples": sum(splits.values()),
                    "splits": splits, "derived": spec.derived is not None})
    return out


def cmd_tasks(args) -> int:
    rows = task_listing(_config(args))
    if args.json:
        keys = ("name", "cluster", "kind", "templates", "examples")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=1))
        return 0
    print(f"{'dataset':<36}{'cluster':<28}{'kind':<6}{'tmpl':>5}{'train':>7}{'valid':>7}  status")
    for r in sorted(rows, key=lambda r: (r["cluster"], r["name"])):
        s = r["splits"]
        status = ("derived (generated from the seed)" if r["derived"] else
                  "no local data" if not r["examples"] else "" if s["train"] else "no train split")
        print(f"{r['name']:<36}{r['cluster']:<28}{r['kind']:<6}{r['templates']:>5}{s['train']:>7}"
              f"{s['validation']:>7}  {status}")
    local = sum(1 for r in rows if r["examples"])
    print(f"\n{len(rows)} datasets ({len({t.paper_dataset for t in load_registry().tasks.values()})} in the "
          f"paper's count), {local} with local or derived data, {len(load_registry().clusters)} clusters")
    return 0


def cmd_preview(args) -> int:
    cfg = _config(args)
    spec = load_registry().get(args.dataset)
    data_dir = data_dirs(cfg)
    split = args.split or next((s for s in SPLITS if has_split(spec, s, data_dir)), None)
    if split is None:
        print(f"flan: dataset {spec.name} has no local data ({spec.notes or 'see flan data tasks'})",
              file=sys.stderr)
        return 1
    rows = load_split(spec, split, data_dir=data_dir, bad_rows=cfg.data.bad_rows, seed=cfg.train.seed).rows
    templates = load_templates(spec)
    for i, row in enumerate(rows[: args.n]):
        index = args.template if args.template is not None else i % len(templates)
        if not 0 <= index < len(templates):
            raise TemplateError(f"{spec.name}: --template {index} out of range 0..{len(templates) - 1}",
                                exit_code=USAGE)
        t = templates[index]
        ex = render_template(spec, t, row)
        flag = ", turned around" if t.turned_around else ""
        print(f"=== {spec.name} {split} row {i}, template {index}{flag} ===")
        print(ex.prompt)
        print(f"--- target ---\n{ex.target}")
        if ex.options:
            print(f"--- options --- {list(ex.options)}")
        print()
    return 0


def mix_report(cfg, tokenizer) -> dict:
    """Rates, examples and tokens per dataset for one epoch of the mixture, and packing efficiency."""
    from flan.mixture import ExampleStream, Mixture
    from flan.packing import efficiency, encode_pairs, pack_rows

    mix = Mixture.from_config(cfg, "train")
    keys = ExampleStream(mix).take(mix.epoch_len)
    rendered = [mix.render(k) for k in keys]
    segments = encode_pairs(tokenizer, [r.prompt for r in rendered], [r.target for r in rendered],
                            input_len=cfg.data.input_len, target_len=cfg.data.target_len)
    tokens, targets = defaultdict(int), defaultdict(int)
    for (name, _, _), seg in zip(keys, segments):
        tokens[name] += seg.length
        targets[name] += sum(1 for label in seg.labels if label >= 0)
    row_len = cfg.data.input_len + cfg.data.target_len
    rows = list(pack_rows(segments, row_len))
    return {
        "heldout_cluster": cfg.data.heldout_cluster,
        "excluded_clusters": load_registry().excluded_clusters(cfg.data.heldout_cluster)
        if cfg.data.heldout_cluster else [],
        "cap": mix.cap, "seed": mix.seed, "row_len": row_len, "epoch_examples": mix.epoch_len,
        "rows_per_epoch": len(rows), "packing_efficiency": round(efficiency(rows, row_len), 4),
        "datasets": [{"name": t.name, "cluster": t.cluster, "local_examples": mix.sizes[t.name],
                      "examples_per_epoch": mix.per_epoch[t.name], "rate": round(mix.rates[t.name], 6),
                      "tokens": tokens[t.name], "target_tokens": targets[t.name],
                      "skipped_rows": mix.skipped_rows[t.name]} for t in mix.tasks],
        "without_local_data": mix.missing,
    }


def cmd_mix(args) -> int:
    from engine.tokenizer import load_tokenizer

    cfg = _config(args)
    report = mix_report(cfg, load_tokenizer(cfg))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'dataset':<30}{'cluster':<28}{'local':>7}{'epoch':>7}{'rate':>9}{'tokens':>10}{'target':>9}")
    for d in report["datasets"]:
        print(f"{d['name']:<30}{d['cluster']:<28}{d['local_examples']:>7}{d['examples_per_epoch']:>7}"
              f"{d['rate']:>9.4f}{d['tokens']:>10}{d['target_tokens']:>9}")
    print(f"\nheld out: {', '.join(report['excluded_clusters']) or 'nothing'}; cap {report['cap']}; "
          f"{report['epoch_examples']} examples per epoch in {report['rows_per_epoch']} rows of "
          f"{report['row_len']} tokens; packing efficiency {report['packing_efficiency']:.2%}")
    skipped = sum(d["skipped_rows"] for d in report["datasets"])
    if skipped:
        print(f"skipped {skipped} malformed rows (data.bad_rows = skip)")
    print(f"eligible but without local train data: {', '.join(report['without_local_data']) or 'none'}")
    return 0


def cmd_prepare(args) -> int:
    from flan.prepare import prepare

    cfg = _config(args)
    reg = load_registry()
    if args.all == bool(args.datasets):
        raise DataError("name the datasets to prepare (e.g. `flan data prepare cb rte`) or pass --all, not both")
    specs = [t for t in reg.tasks.values() if t.origin.preparable] if args.all else [reg.get(n) for n in args.datasets]
    out = Path(args.out or cfg.data.prepared_dir)
    failed = []
    for spec in specs:
        try:
            manifest, wrote = prepare(spec, out_dir=out, from_dir=Path(args.from_dir) if args.from_dir else None,
                                      max_rows=args.max_rows, bad_rows=cfg.data.bad_rows, progress=sys.stderr.isatty())
        except DataError as e:
            if not args.all:
                raise
            failed.append(spec.name)
            print(f"{spec.name}: not prepared: {e}")
            continue
        counts = ", ".join(f"{s} {e['rows']}" + (f" (+{e['skipped']} bad rows skipped)" if e["skipped"] else "")
                           for s, e in manifest["splits"].items())
        print(f"{spec.name}: {'prepared' if wrote else 'up to date'}: {counts} -> {out / spec.data}")
    if failed:
        print(f"{len(failed)} of {len(specs)} datasets not prepared: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def add_data_commands(subparsers) -> None:
    """Register `flan data tasks | preview | mix` on the top-level subparsers of flan/cli.py."""
    data = subparsers.add_parser("data", help="datasets, templates and the tuning mixture")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("tasks", help="every registered dataset with its cluster, kind, templates and local data")
    p.add_argument("--json", action="store_true", help="a JSON list of {name, cluster, kind, templates, examples}")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("preview", help="render real rows of a dataset with its templates")
    p.add_argument("dataset", help="registry name, e.g. rte (see `flan data tasks`)")
    p.add_argument("--template", type=int, default=None, help="template index (default: cycle through all)")
    p.add_argument("--n", type=int, default=3, help="rows to show")
    p.add_argument("--split", choices=SPLITS, default=None, help="default: the first split with data")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("mix", help="mixing rates, examples and tokens per dataset, packing efficiency")
    p.add_argument("config", help="TOML config, e.g. configs/tiny.toml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("prepare", help="bring datasets' public data (hub or a local copy) into data.prepared_dir")
    p.add_argument("datasets", nargs="*", help="registry names (see `flan data tasks`)")
    p.add_argument("--all", action="store_true", help="every dataset whose [source] names a usable hub copy")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="read a local copy (save_to_disk folder or hub-layout parquet/JSON) instead of the hub")
    p.add_argument("--out", default=None, help="output folder (default: data.prepared_dir)")
    p.add_argument("--max-rows", type=int, default=None, help="at most N rows per split")
    p.set_defaults(func=cmd_prepare)
