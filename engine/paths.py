"""Where the repo and the shared data live; the one place that knows the ../shared layout."""
from __future__ import annotations

from pathlib import Path

from engine.errors import FlanError

REPO_ROOT = Path(__file__).resolve().parent.parent


class MissingDataError(FlanError, FileNotFoundError):
    """The shared data folder (or a file the engine expects in it) is not there; names the path and the fix."""


def shared_data_dir(override: str | Path | None = None) -> Path:
    """The folder of real dataset samples and the text corpus (../shared/data beside the repo).

    `override` (a config's data.data_dir) is taken relative to the repo root when not absolute.
    """
    path = Path(override) if override else REPO_ROOT.parent / "shared" / "data"
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_dir():
        raise MissingDataError(
            f"shared data folder not found at {path}: flan-engine reads its datasets and corpus from "
            f"../shared/data beside the repo; put it there or set --data.data_dir=PATH"
        )
    return path
