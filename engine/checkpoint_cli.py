"""`flan checkpoint inspect|convert`: read a sharded checkpoint's index, or rewrite it for another layout.

    flan checkpoint inspect runs/tiny/checkpoints/step-000400 [--verify] [--json]
    flan checkpoint convert runs/tiny/checkpoints/step-000400 runs/tiny-1dev/step-000400 --layout dp=1,pp=1,tp=1

Any checkpoint already loads under any layout; converting rewrites the files so that each rank of the new
layout reads exactly one file of each kind (or one file in all, for a single device, e.g. to ship weights).
Layout-bound optimizer state (Adafactor's factors) converts only into the same slices; --weights-only drops
the optimizer state.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from engine import checkpoint as ckpt
from engine.config import config_from_dict, layout_problem
from engine.errors import USAGE
from engine.parallel.specs import layout_boxes


def parse_layout(text: str) -> dict[str, int]:
    """'dp=1,pp=2,tp=4' -> {"dp": 1, "pp": 2, "tp": 4} (missing degrees are 1)."""
    layout = {"dp": 1, "pp": 1, "tp": 1}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in layout or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--layout {text!r}: write dp=A,pp=B,tp=C with positive integers, "
                                             "e.g. --layout dp=1,pp=1,tp=1")
        layout[key.strip()] = int(value)
    return layout


def inspect(path: Path, verify: bool) -> dict:
    index = ckpt.load_meta(path)
    reader = ckpt.Reader(path, index)
    rows = []
    if verify:  # every stored byte: whole pieces, layout-bound state and every rank's RNG, checksums checked
        for boxed, table in ((True, index["tensors"]), (False, index.get("bound_state", {}))):
            for name, entry in table.items():
                for piece in entry["pieces"]:
                    reader.read_piece(piece, name, boxed=boxed)
        for record in index["ranks"]:
            reader.rng(record["rank"])
    for name, entry in index["tensors"].items():
        rows.append({"name": name, "kind": entry["kind"], "shape": entry["shape"], "dtype": entry["dtype"],
                     "pieces": len(entry["pieces"])})
    return {"path": str(path), "step": index["step"], "layout": index["layout"], "world_size": index["world_size"],
            "optimizer": index.get("optimizer_kind"), "bytes": sum(index["files"].values()),
            "files": len(index["files"]), "tensors": rows, "verified": verify}


def cmd_inspect(args) -> int:
    info = inspect(Path(args.dir), args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    lay = info["layout"]
    print(f"{info['path']}: step {info['step']}, layout dp={lay['dp']} pp={lay['pp']} tp={lay['tp']} "
          f"({info['world_size']} ranks), optimizer state: {info['optimizer'] or 'none'}, "
          f"{info['files']} files, {info['bytes'] / 2**20:.1f} MiB" + (", checksums verified" if args.verify else ""))
    width = max(len(r["name"]) for r in info["tensors"])
    for r in info["tensors"]:
        print(f"  {r['name']:<{width}}  {r['kind']:<5}  {str(tuple(r['shape'])):<16} {r['dtype']:<9} "
              f"{r['pieces']} piece{'s' if r['pieces'] != 1 else ''}")
    return 0


def convert(src: Path, out: Path, layout: dict[str, int], weights_only: bool) -> Path:
    """Rewrite checkpoint `src` as `out`, sharded as the (dp, pp, tp) layout would save it (ZeRO-1 state is
    written whole, as zero=0 saves it: it still loads into ZeRO-1)."""
    index = ckpt.load_meta(src)
    cfg = config_from_dict(index["config"], f"{src / ckpt.INDEX}")
    problem = layout_problem(cfg.model, layout["tp"], layout["pp"])
    if problem:
        raise ckpt.CheckpointError(f"--layout {layout}: this model (config in {src / ckpt.INDEX}) cannot be split "
                                   f"that way: {problem[0]} {problem[1]}", exit_code=USAGE)
    if out.exists():
        raise ckpt.CheckpointError(f"{out}: already exists; choose a new folder for the converted checkpoint",
                                   exit_code=USAGE)
    reader = ckpt.Reader(src, index)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_converted(reader, index, src, tmp, out, cfg, layout, weights_only)
    except BaseException:  # a corrupted input (or a full disk) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_converted(reader, index: dict, src: Path, tmp: Path, out: Path, cfg, layout: dict[str, int],
                     weights_only: bool) -> None:
    model_shapes = {n: tuple(e["shape"]) for n, e in index["tensors"].items() if e["kind"] == "model"}
    rng_record = next(r for r in index["ranks"] if r["rank"] == 0)
    rng_tensors = reader.rng(0)  # checked like every piece: a corrupted input is refused, not re-checksummed
    fragments = []
    world = layout["dp"] * layout["pp"] * layout["tp"]
    for rank in range(world):
        dp_rank, pp_rank, tp_rank = rank // (layout["pp"] * layout["tp"]), rank // layout["tp"] % layout["pp"], \
            rank % layout["tp"]
        share = ckpt.Share(rank)
        if dp_rank == 0:
            boxes = layout_boxes(cfg, model_shapes, layout["pp"], layout["tp"], pp_rank, tp_rank)
            for name, box in boxes.items():
                share.add("model", name, model_shapes[name], box, reader.region(name, box, None))
                if not weights_only:
                    _convert_state(reader, share, name, box)
        share.files[ckpt.rng_file(rank)] = rng_tensors
        scalars = {} if weights_only else index["scalars"]
        fragments.append(ckpt.write_share(tmp, share, {"scalars": scalars, "rng": rng_record["rng"]},
                                           [dp_rank, pp_rank, tp_rank]))
    meta = {k: index[k] for k in ("config", "data", "step") if k in index}
    meta.update(world_size=world, layout=layout, converted_from=str(src),
                optimizer_kind=None if weights_only or index.get("optimizer_kind") is None else "torch")
    ckpt.commit(tmp, out, fragments, meta, keep=0)


def _convert_state(reader, share, name: str, box) -> None:
    index = reader.index
    for state_name, entry in index["tensors"].items():
        if entry["kind"] == "optim" and state_name.rsplit("/", 1)[0] == name:
            share.add("optim", state_name, tuple(entry["shape"]), box, reader.region(state_name, box, None))
    for state_name in index["bound_state"]:
        if state_name.rsplit("/", 1)[0] == name:
            share.add_bound(state_name, box, ckpt.bound_state(reader, state_name, box))


def cmd_convert(args) -> int:
    out = convert(Path(args.dir), Path(args.out), args.layout, args.weights_only)
    lay = args.layout
    print(f"{out}: written for dp={lay['dp']} pp={lay['pp']} tp={lay['tp']}")
    return 0


def add_checkpoint_commands(subparsers) -> None:
    """Register `flan checkpoint inspect|convert` on the `flan` command line's subparsers."""
    group = subparsers.add_parser("checkpoint", help="inspect or convert sharded checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    p = group.add_parser("inspect", help="tensors, layout, step and size of a checkpoint")
    p.add_argument("dir", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step-000400")
    p.add_argument("--verify", action="store_true", help="read every piece and check its checksum")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = group.add_parser("convert", help="rewrite a checkpoint sharded for another layout")
    p.add_argument("dir", help="the checkpoint folder to read")
    p.add_argument("out", help="the new checkpoint folder (must not exist)")
    p.add_argument("--layout", type=parse_layout, required=True, help="target degrees, e.g. dp=1,pp=1,tp=1")
    p.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")
    p.set_defaults(func=cmd_convert)
