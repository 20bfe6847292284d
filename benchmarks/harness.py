"""Shared benchmark harness: timing, peak memory, a printed table, JSON and a line plot.

Every `benchmarks/<op>.py` measures its cases through these helpers so that all suites time the same
way and write the same files:

    from benchmarks.harness import measure, print_table, write_json, plot_lines, output_dir, environment

    m = measure(lambda: op(x), device=x.device)          # Measurement(ms=..., peak_mib=...)
    rows.append({"provider": "ours", "S": 1024, "ms": m.ms, "peak_mib": m.peak_mib})
    print_table(rows, columns=["provider", "S", "ms", "peak_mib"])
    out = output_dir("attention")                         # runs/bench/attention (git-ignored)
    write_json(out / "results.json", rows, meta=environment())
    plot_lines(rows, x="S", y="ms", series="provider", path=out / "ms.png")

Timing uses CUDA events on a GPU (after warm-up, one synchronisation per repetition) and
`time.perf_counter` on the CPU; the reported time is the median over repetitions, which is robust to
the occasional slow outlier. Peak memory is measured on CUDA only (`None` on the CPU, where PyTorch
keeps no allocator statistics).
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measurement:
    """Median and spread of one timed callable, plus its peak memory above the starting point."""

    ms: float
    """Median wall time of one call, in milliseconds."""
    ms_min: float
    """Fastest repetition, in milliseconds."""
    ms_max: float
    """Slowest repetition, in milliseconds."""
    peak_mib: float | None
    """Peak CUDA memory allocated during one call above what was allocated before it (None on CPU)."""


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(fn: Callable[[], Any], *, device: torch.device | str, warmup: int = 3, reps: int = 10,
            setup: Callable[[], Any] | None = None) -> list[float]:
    """Run `fn` `warmup` times untimed, then `reps` times timed; return each repetition's milliseconds.

    `setup`, when given, runs before every call outside the timed region (e.g. zeroing gradients).
    """
    if reps < 1:
        raise ValueError(f"time_ms: reps={reps}; time at least one repetition (reps >= 1)")
    cuda = _is_cuda(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def peak_memory_mib(fn: Callable[[], Any], *, device: torch.device | str) -> float | None:
    """Peak CUDA memory one call of `fn` allocates above what was live before it; None off CUDA."""
    if not _is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(fn: Callable[[], Any], *, device: torch.device | str, warmup: int = 3, reps: int = 10,
            setup: Callable[[], Any] | None = None) -> Measurement:
    """Time `fn` (median of `reps` after `warmup`) and measure its peak memory in one more call."""
    times = time_ms(fn, device=device, warmup=warmup, reps=reps, setup=setup)
    if setup is not None:
        setup()
    peak = peak_memory_mib(fn, device=device)
    return Measurement(ms=statistics.median(times), ms_min=min(times), ms_max=max(times), peak_mib=peak)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows as a fixed-width text table with the given columns (missing values print as '-')."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    """Print `format_table(rows, columns)`, under `title` when given."""
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns))


def commit() -> str:
    """The checkout's short commit hash, "+dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", "HEAD"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> dict:
    """Versions, hardware and commit that a recorded result depends on, for the JSON's metadata."""
    import triton  # imported here: the harness itself does not need triton

    info = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def output_dir(name: str, override: str | Path | None = None) -> Path:
    """The folder a suite writes to: `override` if given, else runs/bench/<name> (git-ignored); created."""
    path = Path(override) if override else REPO_ROOT / "runs" / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, rows: Sequence[dict], meta: dict | None = None) -> Path:
    """Write {"meta": ..., "rows": [...]} as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2) + "\n")
    return path


def plot_lines(rows: Iterable[dict], *, x: str, y: str, series: str | Sequence[str], path: Path,
               title: str = "", panels: str | None = None, logx: bool = True) -> Path:
    """One line per distinct value of `series` (a key or a tuple of keys), y against x, saved as PNG.

    With `panels`, one subplot per distinct value of that key (e.g. the head dimension). Rows whose
    `y` is None (a provider that was unavailable) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: benchmarks run on headless machines
    import matplotlib.pyplot as plt

    keys = (series,) if isinstance(series, str) else tuple(series)
    rows = [r for r in rows if r.get(y) is not None]
    panel_values = sorted({r[panels] for r in rows}, key=str) if panels else [None]
    fig, axes = plt.subplots(1, len(panel_values), figsize=(5.5 * len(panel_values), 4), squeeze=False)
    for ax, panel in zip(axes[0], panel_values):
        in_panel = [r for r in rows if panels is None or r[panels] == panel]
        labels = sorted({tuple(r[k] for k in keys) for r in in_panel}, key=str)
        for label in labels:
            points = sorted((r[x], r[y]) for r in in_panel if tuple(r[k] for k in keys) == label)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=" ".join(map(str, label)))
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{title} {panels}={panel}".strip() if panels else title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a multi-process benchmark's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(worker, rank: int, world: int, port: int, args: tuple, results) -> None:
    """One spawned rank: torchrun's environment, one thread (ranks share the cores), then worker's rows."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results.put((rank, worker(rank, world, *args)))


def run_ranks(worker: Callable, world: int, *args) -> list:
    """Run worker(rank, world, *args) on `world` spawned processes that rendezvous as torchrun's would, and
    return what each returned, in rank order (worker must be a module-level function)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    returned = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return [returned[r] for r in range(world)]
