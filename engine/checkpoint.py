"""Checkpoints as a folder of safetensors + JSON, written atomically; no pickle anywhere.

    <run_dir>/checkpoints/step-000100/
        model.safetensors       weights under the single-device names
        optimizer.safetensors   per-parameter optimizer tensors, keyed "<param name>/<state key>"
        meta.json               config, step, RNG states, data-stream position, optimizer hyperparameters
        COMPLETE                written last: a folder without it is never loaded

A checkpoint is written into a temporary sibling folder and renamed into place only once complete; older
checkpoints beyond the newest `keep` are deleted only after that.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings): safetensors refuses aliases."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """Split optimizer state into tensors keyed "<param>/<key>" and a JSON part (hyperparameters, scalars)."""
    tensors, scalars = {}, {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[id(p)]}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{names[id(p)]}/{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"scalars": scalars, "param_groups": groups}


def restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict,
                      where: Path) -> None:
    by_name = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    optimizer.state.clear()
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pname, key = flat.rsplit("/", 1)
        if pname not in by_name:
            raise CheckpointError(f"{where}: optimizer state for {pname!r}, which this model does not have")
        p = by_name[pname]
        optimizer.state[p][key] = value.to(p.device) if isinstance(value, torch.Tensor) else value
    for group, saved in zip(optimizer.param_groups, meta["param_groups"]):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, param_names: dict[int, str], meta: dict[str, Any],
                    keep: int) -> Path:
    """Write step-<step> atomically and prune to the newest `keep` complete checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(dedup_tied(model_state), str(tmp / "model.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    full_meta = dict(meta, step=step, rng=rng_meta)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_tensors(optimizer, param_names)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        full_meta["optimizer"] = opt_meta
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
    (tmp / COMPLETE).write_text("ok\n")
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint folder; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); the file is truncated or corrupted, "
                              "resume from an older checkpoint") from None


def load_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"{path}: no {COMPLETE} marker, so this checkpoint was never finished; "
                              "use an older one")
    return json.loads((path / "meta.json").read_text())


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    load_meta(path)
    return _load_tensors(Path(path) / "model.safetensors")


def apply_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a single-device state into `model`, checking names and shapes with messages that name both."""
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            if name == "output.weight" and "tok_embeddings.weight" in state:
                continue  # tied: restored through the embedding
            raise CheckpointError(f"{where}: tensor {name!r} is missing; the checkpoint is from another model")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(state[name].shape)} but the "
                                  f"configured model needs {tuple(tensor.shape)}; load it with the config it "
                                  "was saved with")
    extra = sorted(set(state) - set(own))
    if extra:
        raise CheckpointError(f"{where}: tensors {extra[:5]} do not exist in the configured model")
    with torch.no_grad():
        for name, tensor in own.items():
            if name in state:
                tensor.copy_(state[name])


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    param_names: dict[int, str]) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG states; return the meta (step, data position, config)."""
    path = Path(path)
    meta = load_meta(path)
    apply_model_state(model, _load_tensors(path / "model.safetensors"), path / "model.safetensors")
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path}: holds no optimizer state, so training cannot resume from it")
        restore_optimizer(optimizer, param_names, _load_tensors(path / "optimizer.safetensors"),
                          meta["optimizer"], path / "optimizer.safetensors")
    set_rng_state(_load_tensors(path / "rng.safetensors"), meta["rng"])
    return meta
