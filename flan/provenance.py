"""What `flan eval` knows about a checkpoint it scores: the step folder, its run's run.json, the clusters it saw.

    info = checkpoint_info(step_dir)           # folder, step, kind, commit, config hash, heldout clusters, init_from
    seen = seen_clusters(info, registry)       # clusters its weights were tuned on; None when that is unknown

A checkpoint saved by a training run lives at <run_dir>/checkpoints/step-NNNNNN and its run wrote
<run_dir>/run.json (engine/run_log.py): the kind (pretrain or tune), the clusters the tuning mixture left out
and the exact step folder it started from (init_from). A tuning run saw every cluster it did not leave out;
a pretraining run saw none; both inherit what their init_from checkpoint saw, followed down the chain. A
checkpoint without a run.json (imported, or written by hand) has an unknown history: seen_clusters says None
and the caller must say so rather than assume it is clean.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.checkpoint import load_meta
from engine.config import config_from_dict
from engine.run_log import config_hash
from flan.registry import Registry

RUN_RECORD = "run.json"
MAX_CHAIN = 32  # init_from links followed before giving up (a loop of run folders would never end)


def run_record_of(step_dir: Path) -> tuple[Path | None, dict | None]:
    """The run.json of the run that saved this step folder (<run_dir>/checkpoints/step-*), if there is one."""
    step_dir = Path(step_dir)
    if step_dir.parent.name != "checkpoints":
        return None, None
    path = step_dir.parent.parent / RUN_RECORD
    if not path.is_file():
        return None, None
    try:
        return path, json.loads(path.read_text())
    except ValueError:
        return path, None


def checkpoint_info(step_dir: Path) -> dict:
    """The provenance of one checkpoint step folder, as scores.json records it."""
    step_dir = Path(step_dir)
    meta = load_meta(step_dir)
    cfg = config_from_dict(meta["config"], f"{step_dir} (its stored config)")
    path, record = run_record_of(step_dir)
    record = record or {}
    return {"checkpoint": str(step_dir.resolve()), "step": meta.get("step"),
            "run_json": str(path) if path else None, "kind": record.get("kind"),
            "commit": record.get("commit"), "dirty": record.get("dirty"), "config_hash": config_hash(cfg),
            "heldout_clusters": record.get("heldout_clusters") if record else None,
            "init_from": record.get("init_from")}


def seen_clusters(info: dict, registry: Registry) -> list[str] | None:
    """Clusters whose datasets the checkpoint's weights were tuned on (its own run and every init_from before
    it); None when some run in the chain left no run.json."""
    seen: set[str] = set()
    for _ in range(MAX_CHAIN):
        if info["kind"] is None:
            return None
        if info["kind"] == "tune":
            held = set(info["heldout_clusters"] or ())
            seen |= {t.cluster for t in registry.tasks.values() if t.cluster not in held}
        start = info["init_from"]
        if not start:
            return sorted(seen)
        if not Path(start).is_dir():
            return None
        info = checkpoint_info(Path(start))
    return None
