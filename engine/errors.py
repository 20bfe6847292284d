"""One base class for every error a user can cause or fix, and the exit codes `flan` ends with.

    raise ConfigError("configs/x.toml: train.steps: is 0; it must be at least 1")   # exit 2
    raise CheckpointError(f"{path}: fails its checksum; resume from an older checkpoint")  # exit 1
    raise DataError(f"{file}:{line}: not JSON", exit_code=USAGE)                     # an instance may differ

flan/cli.py main() is the one place that turns a FlanError (or a file-system OSError) into one line on
stderr and its exit code; the domain classes (ConfigError, CheckpointError, HFError, DataError, ...) live
beside the code that raises them and only choose their default code here. Exit codes:

    0  success
    1  runtime failure: a damaged or missing input file, a full or read-only disk, a peer process that died
    2  usage: a bad flag, config field or name; the command as typed cannot work
    130 interrupted (Ctrl-C)
"""
from __future__ import annotations

OK, RUNTIME, USAGE, INTERRUPTED = 0, 1, 2, 130


class FlanError(Exception):
    """An expected error: its message names the file, flag or field and what to do; `exit_code` is what
    `flan` exits with (RUNTIME unless a subclass or the raiser says USAGE)."""

    exit_code: int = RUNTIME

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(FlanError):
    """The command as typed cannot work (a flag, field or name); exit 2."""

    exit_code = USAGE


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: the path, what happened, and what to do."""
    import errno

    path = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    fixes = {
        errno.ENOSPC: "no space left on the device; free space there or point the output elsewhere "
                      "(e.g. --train.run_dir=PATH)",
        errno.EDQUOT: "disk quota exceeded; free space there or point the output elsewhere",
        errno.EACCES: "permission denied; make it writable/readable for this user or choose another path",
        errno.EPERM: "operation not permitted; make it writable for this user or choose another path",
        errno.EROFS: "read-only file system; choose a writable path (e.g. --train.run_dir=PATH)",
        errno.ENOENT: "not found; check the path",
        errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
        errno.EISDIR: "is a folder where a file was expected; check the path",
    }
    return f"{path}: {fixes.get(e.errno, (e.strerror or str(e)) + '; check the path and the device')}"
