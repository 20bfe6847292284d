"""Shared test setup: Triton runs through its CPU interpreter, and the shared data folder is located."""
import os

# Must happen before triton is first imported anywhere in the test session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same examples every run (a red CI must be reproducible); a developer's run draws new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")

from engine.paths import shared_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The ../shared/data folder beside the repo (fails with a clear message when absent)."""
    return shared_data_dir()
