"""Saving: every rank writes what it owns, rank 0 merges the parts into the index and commits the folder.

    saver = Checkpointer(run_dir, mesh, keep=2, async_save=True)   # collective: agrees a session id
    saver.save(step, layout, optimizer, meta)                       # every rank, same steps
    saver.wait()                                                    # before exit

Saving (`Checkpointer.save`, every rank): write into `.tmp-step-000100-<session>`, each rank's rank-*.json
last (by rename); a barrier; rank 0 checks that every rank's part is there, every listed file at its recorded
size and every tensor covered exactly, writes index.json and COMPLETE, renames the folder into place, and only
then deletes checkpoints beyond the newest `keep`. With async_save the tensors are copied into CPU staging
buffers and a background thread does the rest while training continues; its barrier is the rank-*.json files
(no collective leaves the main thread); the next save and `wait()` (end of training) join it. A rank killed
mid-save leaves a .tmp folder that is never loaded and is removed by the next session's first commit; a save
that fails (a full disk) removes its own .tmp folder and names the bytes it needed. Rank 0 waits for the other
ranks' parts at most parallel.timeout_s, and not at all once the run is failing (`abort`).
What a rank owns comes from the layout's shard specs (engine/parallel/specs.py).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from engine.checkpoint.format import (COMPLETE, FORMAT, INDEX, CheckpointError, Share, checkpoint_dir, crc, dedup_tied,
                                      list_checkpoints, merge_fragments, rng_file, rng_state)
from engine.errors import os_error_message
from engine.parallel.layout import Layout
from engine.parallel.mesh import Mesh
from engine.parallel.specs import optimizer_pieces


def _rank_share(layout: Layout, optimizer, staging: dict | None) -> tuple[Share, dict]:
    """This rank's tensors to write, and the JSON part (optimizer scalars, RNG)."""
    share = Share(layout.mesh.rank, staging)
    specs = layout.shard_specs()
    for name, p in layout.named_parameters():
        spec = specs[name]
        if spec.writes:
            share.add("model", spec.global_name, spec.global_shape, spec.box, p)
    scalars: dict[str, float] = {}
    if optimizer is not None:
        pieces, scalars, bound = optimizer_pieces(layout, optimizer)
        for piece in pieces:
            share.add("optim", piece.global_name, piece.global_shape, piece.box, piece.tensor)
        for piece in bound:
            share.add_bound(piece.global_name, piece.box, piece.tensor)
    rng_tensors, rng_json = rng_state()
    share.files[rng_file(layout.mesh.rank)] = rng_tensors
    return share, {"scalars": scalars, "rng": rng_json}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_share(tmp: Path, share: Share, extra: dict, coords: list[int]) -> dict:
    """Write this rank's files, then (last, by rename) its rank-*.json: the rendezvous mark rank 0 waits for."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    checksums = {key: crc(t) for tensors in share.files.values() for key, t in tensors.items()}
    for name, tensors in share.files.items():
        save_file(tensors, str(tmp / name))
        _fsync(tmp / name)
        files[name] = (tmp / name).stat().st_size
    for entry in list(share.tensors.values()) + list(share.bound.values()):
        for piece in entry["pieces"]:
            piece["crc32"] = checksums[piece["key"]]
    rng = share.files.get(rng_file(share.rank), {})
    fragment = {"rank": share.rank, "coords": coords, "files": files, "tensors": share.tensors,
                "bound": share.bound, "rng_crc32": {key: checksums[key] for key in rng}, **extra}
    part = tmp / f".rank-r{share.rank:05d}.json.part"
    part.write_text(json.dumps(fragment))
    _fsync(part)
    part.rename(tmp / f"rank-r{share.rank:05d}.json")
    return fragment


# ---- committing (rank 0) ------------------------------------------------------------------------------------
def _wait_for_fragments(tmp: Path, world_size: int, timeout: float, abort: threading.Event) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        if abort.is_set():
            raise CheckpointError(f"{tmp}: save abandoned, the run stopped; the checkpoint stays incomplete and "
                                  "is never loaded")
        present = [tmp / f"rank-r{r:05d}.json" for r in range(world_size)]
        missing = [p.name for p in present if not p.is_file()]
        if not missing:
            return [json.loads(p.read_text()) for p in present]
        if time.monotonic() > deadline:
            raise CheckpointError(f"{tmp}: ranks never finished their part ({', '.join(missing[:4])} missing after "
                                  f"{timeout:.0f}s); the checkpoint stays incomplete and is never loaded")
        time.sleep(0.05)


def commit(tmp: Path, final: Path, fragments: list[dict], meta: dict, keep: int) -> None:
    tensors, bound, scalars, files = merge_fragments(tmp, fragments)
    index = dict(meta, format=FORMAT, files=files, tensors=tensors, bound_state=bound, scalars=scalars,
                 ranks=[{"rank": f["rank"], "coords": f["coords"], "rng": f["rng"], "rng_crc32": f["rng_crc32"]}
                        for f in fragments])
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    _fsync(tmp / INDEX)
    (tmp / COMPLETE).write_text("ok\n")
    _fsync(tmp / COMPLETE)
    if final.exists():  # re-saving a step (after a resume): the new copy is complete, replace the old whole
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    if keep > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """Saves sharded checkpoints of one run, synchronously or in a background thread (async_save).

        saver = Checkpointer(run_dir, mesh, keep=2, async_save=True)   # collective: agrees a session id
        saver.save(step, layout, optimizer, meta)                       # every rank, same steps
        saver.wait()                                                    # before exit
    """

    def __init__(self, run_dir: str | Path, mesh: Mesh, keep: int, async_save: bool = False,
                 timeout: float | None = None):
        self.root = checkpoint_dir(run_dir)
        self.mesh, self.keep, self.async_save = mesh, keep, async_save
        self.timeout = mesh.timeout_s if timeout is None else timeout  # rank 0's wait for the other ranks' parts
        self._abort = threading.Event()
        session = torch.tensor([time.time_ns() % 2 ** 62 + os.getpid()], dtype=torch.int64, device=mesh.device)
        if mesh.world_size > 1:
            dist.broadcast(session, src=0)  # one temporary folder name for every rank of this save
        self.session = f"{int(session):x}"
        self._staging: dict[str, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, layout: Layout, optimizer, meta: dict[str, Any]) -> Path:
        """Write step-<step> of this rank's part of `layout` and of its optimizer (meta: config, data position,
        ... as JSON); returns its final path."""
        self.wait()
        share, extra = _rank_share(layout, optimizer, self._staging if self.async_save else None)
        kind = None if optimizer is None else "zero1" if layout.zero else "torch"
        meta = json.loads(json.dumps(meta))  # a snapshot: the data stream moves on while an async save runs
        return self._save_share(step, share, extra, dict(meta, optimizer_kind=kind))

    def _save_share(self, step: int, share: Share, extra: dict, meta: dict[str, Any]) -> Path:
        mesh = self.mesh
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}-{self.session}"
        coords = [mesh.dp_rank, mesh.pp_rank, mesh.tp_rank]
        meta = dict(meta, step=step, world_size=mesh.world_size, layout={"dp": mesh.dp, "pp": mesh.pp, "tp": mesh.tp})
        if not self.async_save:
            try:
                write_share(tmp, share, extra, coords)
                if mesh.world_size > 1:
                    dist.barrier()
                if mesh.rank == 0:
                    self._commit_and_clean(tmp, final, meta)
            except Exception as e:
                raise self._failed(e, tmp, final, share) from e
            if mesh.world_size > 1:
                dist.barrier()  # nobody goes on (or loads) before the checkpoint is in place
            return final

        def work():
            try:
                write_share(tmp, share, extra, coords)
                if mesh.rank == 0:
                    self._commit_and_clean(tmp, final, meta)
            except BaseException as e:  # surfaced by the next save or wait()
                self._error = self._failed(e, tmp, final, share)

        # A daemon: a run that fails never waits on its save (abort() ends the rendezvous at once); a save cut
        # short leaves only its .tmp folder, which is never loaded. A finished run joins it in wait().
        self._thread = threading.Thread(target=work, name=f"checkpoint-step-{step}", daemon=True)
        self._thread.start()
        return final

    def _failed(self, error: BaseException, tmp: Path, final: Path, share: Share) -> BaseException:
        """For a file-system error (a full disk): remove the partial folder (a retry must not add another) and
        say where and how many bytes this rank's part needs. Other failures (a peer that died) leave it to the
        next session's first commit, like a kill does."""
        if not isinstance(error, OSError):
            return error
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for tensors in share.files.values() for t in tensors.values())
        try:
            free = f"{shutil.disk_usage(self.root).free / 2**20:.1f} MiB are free there"
        except OSError:
            free = "the free space there is unknown"
        return CheckpointError(f"{final}: checkpoint not saved: {os_error_message(error)}; this rank's part needs "
                               f"about {needed / 2**20:.1f} MiB and {free}; the partial folder {tmp.name} was "
                               "removed and older checkpoints are untouched")

    def abort(self) -> None:
        """The run is failing: end a background save's wait for the other ranks now."""
        self._abort.set()

    def _commit_and_clean(self, tmp: Path, final: Path, meta: dict) -> None:
        fragments = _wait_for_fragments(tmp, self.mesh.world_size, self.timeout, self._abort)
        commit(tmp, final, fragments, meta, self.keep)
        for stale in self.root.glob(".tmp-step-*"):  # left by killed sessions: never loadable, now removable
            if not stale.name.endswith(self.session):
                shutil.rmtree(stale, ignore_errors=True)

    def wait(self) -> None:
        """Join the background save, if any, and raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def save_weights(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], meta: dict[str, Any],
                 keep: int) -> Path:
    """A single-device state dict (weights only) as a one-rank checkpoint: what importers write. Training
    state goes through Checkpointer.save, which knows the layout."""
    share = Share(0)
    for name, t in dedup_tied(model_state).items():
        share.add("model", name, tuple(t.shape), tuple((0, n) for n in t.shape), t)
    rng_tensors, rng_json = rng_state()
    share.files[rng_file(0)] = rng_tensors
    return Checkpointer(run_dir, Mesh(), keep)._save_share(step, share, {"scalars": {}, "rng": rng_json},
                                                           dict(meta, optimizer_kind=None))
