"""Run a function on N real processes talking gloo over 127.0.0.1, as torchrun would start them.

    results = launch(worker, 4, arg1, arg2)      # worker(arg1, arg2) on ranks 0..3; results[rank]

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the
worker calls engine.parallel.init_mesh exactly as training does. `worker` must be a module-level function
and its arguments and return value small picklable objects. A rank that raises stops the whole launch,
and the error carries that rank's traceback; a launch that outlives `timeout` (a hung collective) is killed.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import traceback

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
