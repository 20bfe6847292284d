"""Before a training run does any work, and when it resumes: the checks that need no model, and the choice of
the checkpoint to continue from.

    preflight(cfg, kind)     # device, batch split, init_from, resume decision, a writable run folder
    start = resume(run_dir, cfg, kind, layout, optimizer, source)   # the step to start from

train.resume decides what a run folder with (or without) checkpoints means:
    false  start at step 0; a run folder that holds checkpoints is refused, never overwritten
    true   continue from the newest intact checkpoint; none (or no such folder) is refused
    auto   continue when there is one, start fresh when there is none; says which
train.resume_from=step-N (or N) picks that checkpoint (and implies resuming). A changed model shape, row length
or global batch is refused naming the stored and the new value; a changed learning rate, schedule or step count
goes on with a notice. A damaged newest checkpoint (unreadable index, missing file, failed checksum) is skipped
with a warning naming it, for the newest intact one; every rank agrees on the one they load.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.config import Config, ConfigError, batch_problem, resolve_auto

SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "mlp",
                "tie_embeddings")
"""Model fields that change a weight's shape or meaning: a checkpoint resumes only into the same values."""


def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"flan: {text}", file=sys.stderr, flush=True)


def preflight(cfg: Config, kind: str) -> None:
    """Every check a training run can make before building anything, each naming its field: the device,
    the batch split over the launched world, train.init_from, the resume decision (and the chosen
    checkpoint's config), and last a writable run folder."""
    from engine.parallel.mesh import resolve_degrees

    resolve_auto(cfg)  # train.device=cuda without CUDA
    dp, _, _ = resolve_degrees(int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel)
    problem = batch_problem(cfg.train, cfg.parallel, dp)
    if problem:
        raise ConfigError(f"{problem[0]}: {problem[1]}")
    if cfg.train.init_from:
        where = Path(cfg.train.init_from)
        if not (where / ckpt.COMPLETE).is_file() and ckpt.latest_checkpoint(where) is None:
            state = "does not exist" if not where.exists() else "is neither a complete checkpoint nor a run folder " \
                                                                 "holding one"
            raise ConfigError(f"train.init_from: {where} {state}; give a step-NNNNNN folder or a run folder with "
                              "checkpoints/")
    candidates = _candidates(cfg)
    if candidates:
        _check_newest_readable(candidates, cfg, kind)
    check_writable(Path(cfg.train.run_dir))


def check_writable(run_dir: Path) -> None:
    """Create the run folder if needed and write (then remove) a probe file there: a folder that cannot be
    written is reported now, not at the first checkpoint."""
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        from engine.errors import os_error_message

        raise ConfigError(f"train.run_dir: {run_dir} cannot be written ({os_error_message(e)}); choose a "
                          "writable --train.run_dir") from None


def _mode(cfg: Config):
    return True if cfg.train.resume_from else cfg.train.resume


def _candidates(cfg: Config) -> list[Path]:
    """The checkpoints to try, newest first (the one train.resume_from names); raises when the resume mode
    and the run folder disagree."""
    run_dir, mode = Path(cfg.train.run_dir), _mode(cfg)
    found = ckpt.list_checkpoints(run_dir)
    if cfg.train.resume_from:
        name = cfg.train.resume_from.strip()
        digits = name.removeprefix("step-")
        if not digits.isdigit():
            raise ConfigError(f"train.resume_from: {name!r} is not a step; write step-000300 or 300")
        chosen = ckpt.checkpoint_dir(run_dir) / f"step-{int(digits):06d}"
        if chosen not in found:
            raise ConfigError(f"train.resume_from: {chosen} is not a complete checkpoint; complete ones: "
                              f"{', '.join(p.name for p in found) or 'none'}")
        return [chosen]
    if mode is False:
        if found:
            raise ConfigError(f"train.run_dir: {run_dir} already holds checkpoints (newest {found[-1].name}); pass "
                              "--train.resume=true to continue that run, or choose another --train.run_dir")
        return []
    if not found and mode is True:
        if not run_dir.exists():
            state = "does not exist"
        elif list(ckpt.checkpoint_dir(run_dir).glob(".tmp-step-*")):
            state = "holds no complete checkpoint (only unfinished saves, never loaded)"
        else:
            state = "holds no checkpoint"
        raise ConfigError(f"train.resume: true, but {run_dir} {state}; pass --train.resume=auto to start fresh "
                          "when there is none, or point --train.run_dir at the run to continue")
    return list(reversed(found))


def _check_newest_readable(candidates: list[Path], cfg: Config, kind: str) -> None:
    """The config check against the newest checkpoint whose index reads (its bytes are verified at load)."""
    damaged = []
    for path in candidates:
        try:
            index = ckpt.load_meta(path)
        except ckpt.CheckpointError as e:
            damaged.append(str(e))
            continue
        check_compatible(index, cfg, kind, path)
        return
    raise ckpt.CheckpointError(f"{Path(cfg.train.run_dir)}: every checkpoint is damaged ({'; '.join(damaged[:3])}); "
                               "nothing was changed")


def check_compatible(index: dict, cfg: Config, kind: str, path: Path) -> list[str]:
    """Refuse a resume whose model shape, row length or global batch differs from the checkpoint's (naming the
    stored and the new value); return notices for what may change (learning rate, schedule, step count)."""
    stored = index.get("config", {})
    new = cfg.to_dict()
    refused = [("model", f) for f in SHAPE_FIELDS] + [("train", "batch_size")]
    refused += [("data", "seq_len")] if kind == "pretrain" else [("data", "input_len"), ("data", "target_len")]
    for section, name in refused:
        old = stored.get(section, {}).get(name, new[section][name])
        if old != new[section][name]:
            raise ConfigError(f"{section}.{name}: {path} was trained with {old!r}, this run has "
                              f"{new[section][name]!r}; resume with --{section}.{name}={old} or start a new run "
                              f"from its weights with --train.init_from={path} and another --train.run_dir")
    notices = []
    noticed = [("optim", f) for f in new["optim"]] + [("train", "steps")]
    for section, name in noticed:
        old = stored.get(section, {}).get(name, new[section][name])
        if old != new[section][name]:
            notices.append(f"{section}.{name} changed since {path.name}: {old!r} -> {new[section][name]!r}")
    return notices


def resume(run_dir: Path, cfg: Config, kind: str, layout, optimizer, source) -> int:
    """The step to start from: the newest intact checkpoint's (weights, optimizer, RNG and data position
    restored) when train.resume says so, else 0."""
    candidates = _candidates(cfg)
    if not candidates:
        if _mode(cfg) == "auto":
            _say(f"train.resume=auto: {run_dir} holds no checkpoint; starting fresh at step 0")
        return 0
    mesh = layout.mesh
    damaged = []
    for path in candidates:
        error, notices = None, []
        try:
            notices = check_compatible(ckpt.load_meta(path), cfg, kind, path)
            meta = ckpt.load_checkpoint(path, layout, optimizer)
        except ckpt.CheckpointError as e:
            error = e
        if _everyone_ok(error is None, mesh):
            for path_, why in damaged:
                _say(f"warning: skipped damaged checkpoint {path_} ({why}); resuming from {path.name} instead")
            for notice in notices:
                _say(f"notice: {notice}")
            _say(f"resuming from {path} (step {meta['step']})")
            source.load_state_dict(meta["data"])
            return meta["step"]
        if cfg.train.resume_from:
            raise error or ckpt.CheckpointError(f"{path}: damaged on another rank; see its message")
        damaged.append((path, error or "damaged on another rank"))
    raise ckpt.CheckpointError(f"{run_dir}: every checkpoint is damaged ({'; '.join(str(w) for _, w in damaged[:3])})"
                               "; nothing was changed, restore a copy or start a new --train.run_dir")


def _everyone_ok(ok: bool, mesh) -> bool:
    """Whether every rank loaded its part: one damaged file on one rank sends all of them to the same older
    checkpoint."""
    if mesh.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=mesh.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
