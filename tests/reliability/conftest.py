"""The reliability suite's fixtures: one small trained run made once per session, and fresh copies of it for
the tests that damage or resume it (the helpers live in harness.py)."""
import shutil
from pathlib import Path

import pytest

from tests.reliability.harness import TRAINED_STEPS, pretrain


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data) -> Path:
    """One pretraining run of TRAINED_STEPS steps (checkpoints step-000002, step-000004), made once per
    session; tests copy it with `copy_run` and never touch it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    rc, _, err = pretrain(run, f"--train.steps={TRAINED_STEPS}", "--train.ckpt_every=2", "--train.keep_checkpoints=3")
    assert rc == 0, err
    return run


@pytest.fixture
def copy_run(trained_run, tmp_path):
    """A fresh copy of the shared run for one test to damage or resume."""
    def make(name: str = "run") -> Path:
        dest = tmp_path / name
        shutil.copytree(trained_run, dest, symlinks=True)
        return dest
    return make
