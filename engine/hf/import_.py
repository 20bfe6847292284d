"""`flan import-hf`: a transformers Llama-architecture folder streamed into our sharded checkpoint format.

    import_hf("path/to/llama", "runs/llama", dtype="bfloat16", layout={"dp": 1, "pp": 1, "tp": 2})
    -> runs/llama/checkpoints/step-000000 (the shards of that layout), runs/llama/config.toml, the tokenizer

Tensor by tensor: each is read from its safetensors file, cast to --dtype, sliced into the regions the
layout's ranks own (`layout_boxes`, the converter's rule) and written at its place in each rank's file, whose
header is known up front from the shapes; so the host holds one tensor and its slices, never the model.
Paths in the folder's weight_map stay inside the folder (no "..", no absolute paths, no symlinks leading
out). The target folder must not exist or be empty: an import never mixes with a run already there (a run's
newer steps would outrank it, its pruning delete it); a failed import removes what it wrote.

Under torchrun (`flan import-hf` passes world=WORLD_SIZE) each rank writes only its own files of the layout (--layout, whose size
must be the world; without it dp = the world): it reads just the tensors it holds a region of. Rank 0
writes the tokenizer and config.toml first and commits the index once every rank's part is there; every
step ends with an all-reduce of "did any rank fail", so no rank waits on a peer that has stopped.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engine.checkpoint import checkpoint_dir, commit
from engine.checkpoint.format import crc, rng_state
from engine.config import Config, layout_problem
from engine.errors import USAGE
from engine.hf.config import HFError, hf_name, model_config_from_llama, our_name
from engine.hf.safetensors_stream import StreamWriter, read_header, read_tensor
from engine.parallel.boxes import box_shape
from engine.parallel.mesh import coordinates
from engine.parallel.specs import layout_boxes

OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


def confined(folder: Path, relative: str, where: Path) -> Path:
    """`relative` (read from a file) as a path inside `folder`, or HFError: no "..", absolute or escaping link."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise HFError(f"{where}: path {relative!r} leaves the model folder; weight files must lie inside it")
    path = folder / rel
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise HFError(f"{where}: {relative!r} is a link to {path.resolve()}, outside the model folder")
    return path


def weight_sources(folder: Path) -> dict[str, tuple[Path, int, dict]]:
    """HF tensor name -> (file, data start, header entry), from model.safetensors or the index's weight_map."""
    single, index = folder / "model.safetensors", folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: confined(folder, f, index) for name, f in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{index}: no readable weight_map ({e})") from None
    elif single.is_file():
        files = {name: single for name in read_header(single)[0]}
    else:
        raise HFError(f"{folder}: neither model.safetensors nor {INDEX_FILE} found; save the model with "
                      "safe_serialization=True (pickled .bin weights are not read)")
    out, headers = {}, {}
    for name, path in files.items():
        if path not in headers:
            if not path.is_file():
                raise HFError(f"{path}: listed in {INDEX_FILE} but missing")
            headers[path] = read_header(path)
        header, start = headers[path]
        if name not in header:
            raise HFError(f"{path}: has no tensor {name!r}, which {INDEX_FILE} places there")
        out[name] = (path, start, header[name])
    return out


def _our_sources(folder: Path, model_cfg) -> dict[str, tuple[Path, int, dict]]:
    """Our tensor name -> source, checked for completeness and shape against the config (nothing read)."""
    from engine.model import Transformer

    ours = {}
    for name, src in weight_sources(folder).items():
        mine = our_name(name, folder)
        if mine is not None:
            ours[mine] = src
    if model_cfg.tie_embeddings:
        ours.pop("output.weight", None)  # some tied models store the head too: it is the embedding
    with torch.device("meta"):
        wanted = Transformer(model_cfg).state_dict()
    if model_cfg.tie_embeddings:
        wanted.pop("output.weight")
    for name, t in wanted.items():
        if name not in ours:
            extra = " and tie_word_embeddings is false" if name == "output.weight" else ""
            raise HFError(f"{folder}: tensor {hf_name(name)!r} is missing from the weights{extra}")
        shape = tuple(ours[name][2]["shape"])
        if shape != tuple(t.shape):
            raise HFError(f"{ours[name][0]}: tensor {hf_name(name)!r} has shape {shape}, but config.json implies "
                          f"{tuple(t.shape)}")
    return {name: ours[name] for name in wanted}


def check_target(run_dir: Path) -> None:
    """Import only into a new or empty folder: a run already there would prune or outrank the import."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise HFError(f"{run_dir}: already exists and is not empty (a run or other files); import into a new "
                      "folder, e.g. runs/<model-name>", exit_code=USAGE)


def import_layout(layout: dict[str, int] | None, world: int) -> dict[str, int]:
    """The layout an import writes: --layout (under torchrun its dp x pp x tp must be the number of processes),
    else, under torchrun, the engine's default for that world (dp = every process, pp = tp = 1)."""
    if layout is None:
        return {"dp": world, "pp": 1, "tp": 1}
    layout = dict({"dp": 1, "pp": 1, "tp": 1}, **layout)
    n = math.prod(layout.values())
    if world > 1 and n != world:
        raise HFError(f"--layout dp={layout['dp']},pp={layout['pp']},tp={layout['tp']}: {n} ranks, but torchrun "
                      f"started {world} processes (WORLD_SIZE); launch {n} or change --layout", exit_code=USAGE)
    return layout


def write_shards(sources: dict[str, tuple[Path, int, dict]], tmp: Path, cfg: Config, dtype: torch.dtype,
                 layout: dict[str, int], ranks: list[int]) -> list[dict]:
    """Write the files of `ranks` (all of them in one process, its own under torchrun) into `tmp`, one source
    tensor in memory at a time, each read once whatever the number of ranks it feeds; their index parts."""
    dp, pp, tp = layout["dp"], layout["pp"], layout["tp"]
    shapes = {name: tuple(src[2]["shape"]) for name, src in sources.items()}
    # Data-parallel replicas write no weights (one writer per region); a pipeline stage only its layers.
    boxes = {r: layout_boxes(cfg, shapes, pp, tp, *coordinates(r, dp, pp, tp)[1:])
             if coordinates(r, dp, pp, tp)[0] == 0 else {} for r in ranks}
    writers = {r: StreamWriter(tmp / f"model-r{r:05d}.safetensors",
                               {f"{n}#0": (dtype, box_shape(b)) for n, b in boxes[r].items()})
               for r in ranks if boxes[r]}
    tensors: dict[int, dict] = {r: {} for r in ranks}
    for name, (path, start, entry) in sources.items():
        if not any(name in boxes[r] for r in writers):
            continue
        full = read_tensor(path, start, entry).to(dtype)
        for r, writer in writers.items():
            box = boxes[r].get(name)
            if box is None:
                continue
            piece = full[tuple(slice(a, b) for a, b in box)].contiguous()
            writer.write(f"{name}#0", piece)
            tensors[r][name] = {"shape": list(shapes[name]), "dtype": str(dtype).removeprefix("torch."),
                                "kind": "model", "pieces": [{"file": writer.path.name, "key": f"{name}#0",
                                                             "box": [list(b) for b in box], "crc32": crc(piece)}]}
            del piece
        del full
    sizes = {r: {w.path.name: w.close()} for r, w in writers.items()}
    rng_tensors, rng_json = rng_state()
    fragments = []
    for r in ranks:
        rng_file = tmp / f"rng-r{r:05d}.safetensors"
        save_file(rng_tensors, str(rng_file))
        files = dict(sizes.get(r, {}), **{rng_file.name: rng_file.stat().st_size})
        fragments.append({"rank": r, "coords": list(coordinates(r, dp, pp, tp)), "files": files,
                          "tensors": tensors[r], "bound": {}, "scalars": {}, "rng": rng_json,
                          "rng_crc32": {key: crc(t) for key, t in rng_tensors.items()}})
    return fragments


def _step_folders(run_dir: Path) -> tuple[Path, Path]:
    root = checkpoint_dir(run_dir)
    return root / ".tmp-step-000000-import", root / "step-000000"


def _commit(tmp: Path, final: Path, fragments: list[dict], layout: dict[str, int], meta: dict) -> Path:
    commit(tmp, final, fragments, dict(meta, step=0, world_size=len(fragments), layout=dict(layout),
                                       optimizer_kind=None), keep=1)
    return final


def stream_weights(sources: dict[str, tuple[Path, int, dict]], run_dir: Path, cfg: Config, dtype: torch.dtype,
                   layout: dict[str, int], meta: dict) -> Path:
    """Write <run_dir>/checkpoints/step-000000 sharded for `layout`, every rank's files from this process."""
    tmp, final = _step_folders(run_dir)
    tmp.mkdir(parents=True)
    fragments = write_shards(sources, tmp, cfg, dtype, layout, list(range(math.prod(layout.values()))))
    return _commit(tmp, final, fragments, layout, meta)


class _Ranks:
    """The torchrun processes of one import: `agreed` runs a step on each and then tells every rank whether
    any failed (gloo all-reduce), so a rank whose peer stopped raises instead of waiting at the next step."""

    def __init__(self, world: int, timeout_s: float):
        self.world, self.rank = world, int(os.environ.get("RANK", 0)) if world > 1 else 0
        self.owns_group = world > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("gloo", rank=self.rank, world_size=world, timeout=timedelta(seconds=timeout_s))

    def agreed(self, step, *, only_rank0: bool = False):
        error, result = None, None
        try:
            if self.rank == 0 or not only_rank0:
                result = step()
        except Exception as e:
            error = e
        if self.world > 1:
            failed = torch.tensor([int(error is not None)])
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and error is None:
                raise HFError("flan import-hf: another rank stopped the import (its error names the cause); "
                              "nothing of it is kept")
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def _rank_fragment(tmp: Path, fragment: dict) -> None:
    """This rank's index part, as rank-rNNNNN.json in the step folder (rank 0 merges them after a barrier)."""
    part = tmp / f".rank-r{fragment['rank']:05d}.json.part"
    part.write_text(json.dumps(fragment))
    part.rename(tmp / f"rank-r{fragment['rank']:05d}.json")


def _remove_import(run_dir: Path, existed: bool) -> None:
    """Undo a failed import: the folder it made, or what it wrote into the empty folder it was given."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in run_dir.iterdir():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def import_hf(folder: str | Path, run_dir: str | Path, dtype: str = "float32", layout: dict[str, int] | None = None,
              trust: str = "auto", world: int = 1) -> Path:
    """Bring a Llama-architecture HF folder in as <run_dir>/checkpoints/step-000000 (+ config.toml, tokenizer).
    `world`: the processes importing together (`flan import-hf` under torchrun passes WORLD_SIZE; every one
    calls this with the same arguments): each writes its own shards, rank 0 commits the index after them."""
    folder, run_dir = Path(folder), Path(run_dir)
    ranks = _Ranks(world, Config().parallel.timeout_s)
    try:
        cfg, sources, layout = ranks.agreed(lambda: _checked(folder, run_dir, dtype, import_layout(layout, world)))
        existed = run_dir.exists()
        try:
            ranks.agreed(lambda: _write_run_files(folder, run_dir, cfg, trust), only_rank0=True)
            # Rank 0's cfg now names the tokenizer it wrote; only rank 0 commits this meta.
            meta = {"config": cfg.to_dict(), "imported_from": str(folder), "source_dtypes": sorted(
                {e["dtype"] for _, _, e in sources.values()})}
            if world == 1:
                return stream_weights(sources, run_dir, cfg, OUT_DTYPES[dtype], layout, meta)
            tmp, final = _step_folders(run_dir)
            ranks.agreed(lambda: tmp.mkdir(parents=True), only_rank0=True)
            ranks.agreed(lambda: _rank_fragment(tmp, write_shards(sources, tmp, cfg, OUT_DTYPES[dtype], layout,
                                                                  [ranks.rank])[0]))
            ranks.agreed(lambda: _commit(tmp, final, [json.loads((tmp / f"rank-r{r:05d}.json").read_text())
                                                      for r in range(world)], layout, meta), only_rank0=True)
            return final
        except BaseException:
            if ranks.rank == 0:
                _remove_import(run_dir, existed)
            raise
    finally:
        ranks.close()


def _checked(folder: Path, run_dir: Path, dtype: str, layout: dict[str, int]):
    """Everything checked before anything is written (on every rank): (config, tensor sources, layout)."""
    if dtype not in OUT_DTYPES:
        raise HFError(f"--dtype {dtype!r}: choose one of {', '.join(OUT_DTYPES)}")
    check_target(run_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path}: not found; point import-hf at a transformers model folder")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except ValueError as e:
        raise HFError(f"{config_path}: not valid JSON ({e})") from None
    model_cfg = model_config_from_llama(hf_cfg, config_path)
    problem = layout_problem(model_cfg, layout["tp"], layout["pp"])
    if problem:
        raise HFError(f"--layout {layout}: this model ({config_path}) cannot be split that way: {problem[1]}")
    sources = _our_sources(folder, model_cfg)
    cfg = Config(model=model_cfg)
    cfg.parallel.tp, cfg.parallel.pp = layout["tp"], layout["pp"]
    cfg.train.run_dir = str(run_dir / "tuned")
    return cfg, sources, layout


def _write_run_files(folder: Path, run_dir: Path, cfg: Config, trust: str) -> None:
    """The tokenizer (checked against transformers before anything is written) and config.toml; fills in
    cfg.data.tokenizer."""
    from engine.hf.tokenizer_check import bring_tokenizer

    with bring_tokenizer(folder, trust) as staged:
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in staged.iterdir():
            shutil.copyfile(f, run_dir / f.name)
    tokenizer_file = next(run_dir / n for n in ("tokenizer.model", "tokenizer.json") if (run_dir / n).is_file())
    cfg.data.tokenizer = str(tokenizer_file.resolve())
    cfg.validate(str(folder / "config.json"))
    (run_dir / "config.toml").write_text(config_toml(cfg, f"imported by `flan import-hf` from {folder}"))


def config_toml(cfg: Config, comment: str) -> str:
    """A TOML preset reproducing `cfg` (every section and field), for tuning an imported model."""
    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = [f"# {comment}"]
    for section, table in cfg.to_dict().items():
        lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"

