"""The reliability suite's harness: `flan` run as a user runs it (a subprocess in the repo root) and the checks
every case makes (conftest.py holds the one small trained run the session shares).

    rc, out, err = flan("pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={run}")
    one_error_line(err, "train.log_every")      # one `flan CMD: ... error: ...` line naming it, no traceback
    before = snapshot(folder); ...; assert snapshot(folder) == before   # nothing changed or gone
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from engine.paths import REPO_ROOT

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=2",
         "--model.head_dim=32", "--model.d_ff=128", "--data.seq_len=32", "--train.batch_size=4",
         "--optim.warmup_steps=2", "--train.val_every=0"]
"""A model of 0.3M parameters on rows of 32 tokens: a step takes milliseconds on a CPU."""

TRAINED_STEPS = 4
"""The shared run: 4 steps, checkpoints at steps 2 and 4."""


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)


def flan(*args: str, timeout: float = 120, script: Path | None = None, **extra_env: str) -> tuple[int, str, str]:
    """`python -m flan ARGS` (or `python SCRIPT ARGS`, a wrapper that patches a fault in first) in the repo
    root; (exit code, stdout, stderr)."""
    cmd = [sys.executable, *([str(script)] if script else ["-m", "flan"]), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env(**extra_env))
    return proc.returncode, proc.stdout, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 180) -> tuple[int, str, str]:
    """`torchrun --nproc-per-node=N -m flan ARGS` on gloo processes of this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "flan", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env())
    return proc.returncode, proc.stdout, proc.stderr


def pretrain(run: Path, *flags: str, **kw) -> tuple[int, str, str]:
    return flan("pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={run}", *flags, **kw)


def one_error_line(err: str, *needles: str) -> str:
    """The one error line of `err` (which holds no traceback), checked to contain every needle."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("flan ") and "error" in line.split(":", 2)[1]]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): a test compares it before and after."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip(path: Path, offset: int = -40) -> None:
    """One flipped byte near the end of the file: inside the last stored tensor's values."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
