"""Run a function on N real processes talking gloo over 127.0.0.1, as torchrun would start them.

    results = launch(worker, 4, arg1, arg2)      # worker(arg1, arg2) on ranks 0..3; results[rank]

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the
worker calls engine.parallel.init_mesh exactly as training does. `worker` must be a module-level function
and its arguments and return value small picklable objects. A rank that raises stops the whole launch,
and the error carries that rank's traceback; a launch that outlives `timeout` (a hung collective) is killed.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
import socket
import subprocess
import sys
import traceback
from pathlib import Path

from engine.paths import REPO_ROOT

# Children fork from a server that imported torch once: each rank then starts in a fraction of a second,
# and no rank inherits the thread pools of the pytest process (fork after OpenMP use can hang).
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(worker, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        results.put((rank, True, worker(*args)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(worker, world_size: int, *args, timeout: float = 120.0) -> list:
    """worker(*args) on `world_size` processes; the list of their return values by rank."""
    port = free_port()
    results = _CONTEXT.Queue()
    procs = [_CONTEXT.Process(target=_run_rank, args=(worker, rank, world_size, port, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    by_rank: dict[int, object] = {}
    try:
        while len(by_rank) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(by_rank))
                raise TimeoutError(f"launch({worker.__name__}): ranks {missing} gave no result within {timeout}s "
                                   "(a collective that not every rank entered?)") from None
            if not ok:
                raise RuntimeError(f"launch({worker.__name__}): rank {rank} of {world_size} failed:\n{value}")
            by_rank[rank] = value
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [by_rank[r] for r in range(world_size)]


# ---- the `flan` command under torchrun, as users launch it --------------------------------------------------
def two_node_torchrun(nproc_per_node: int) -> list[list[str]]:
    """The launcher of each of two torchrun "nodes" on localhost (node ranks 0 and 1, one rendezvous)."""
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc-per-node={nproc_per_node}",
              "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return [[*common, f"--node-rank={node}"] for node in (0, 1)]


def start_flan(launcher: list[str], run_dir, *flags: str, command: str = "pretrain") -> subprocess.Popen:
    """`flan COMMAND configs/tiny.toml FLAGS` under `launcher` (torchrun, or plain python for one device)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # several processes share the cores
    argv = [*launcher, "-m", "flan", command, "configs/tiny.toml", *flags, f"--train.run_dir={run_dir}"]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-4000:]}"


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def two_nodes_and_one_device(tmp_path, name: str, nproc_per_node: int, flags: list[str], layout: list[str],
                             command: str = "pretrain") -> tuple[list[dict], list[dict]]:
    """`flan COMMAND FLAGS` on one device (run "one") and under two torchrun nodes with LAYOUT (run `name`), all
    at once; returns both metrics.jsonl files."""
    nodes = [start_flan(launcher, tmp_path / name, *flags, *layout, command=command)
             for launcher in two_node_torchrun(nproc_per_node)]
    one = start_flan([sys.executable], tmp_path / "one", *flags, command=command)
    for proc in (*nodes, one):
        finish(proc)
    return read_metrics(tmp_path / "one"), read_metrics(tmp_path / name)


def assert_same_logs(single: list[dict], parallel: list[dict], steps: int, tolerance: float) -> None:
    """Every step's loss and gradient norm equal within `tolerance` relative."""
    assert [r["step"] for r in parallel] == [r["step"] for r in single] == list(range(1, steps + 1))
    for a, b in zip(single, parallel):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= tolerance * abs(a[key]), (key, a, b)
