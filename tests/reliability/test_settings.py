"""Issue 20 item 7: settings that used to be caught late (after step 1, at the first save) or never are
refused by validate() before any work, naming the field; nothing is written."""
import pytest
import torch

from tests.reliability.harness import flan, one_error_line, pretrain


@pytest.mark.parametrize("flags, needle", [
    (["--train.log_every=0"], "train.log_every: is 0"),
    (["--train.val_every=2", "--train.val_batches=0"], "train.val_batches: is 0"),
    (["--eval.batch_size=0"], "eval.batch_size: is 0"),
    (["--optim.lr=nan"], "optim.lr: is nan"),
    (["--optim.beta1=2"], "optim.beta1: is 2.0"),
    (["--parallel.dp=3"], "train.batch_size: 4 rows do not split over parallel.dp=3"),
    (["--parallel.dp=1", "--parallel.pp=2", "--parallel.microbatches=3"], "parallel.microbatches: train.batch_size=4"),
    pytest.param(["--train.device=cuda"], "train.device: cuda, but torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_values_are_refused_before_any_work(tmp_path, flags, needle):
    rc, out, err = pretrain(tmp_path / "run", "--train.steps=2", *flags)
    assert rc == 2 and out == ""
    one_error_line(err, "config error", needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, needle", [
    ('[train]\nsteps = "5"\n', "train.steps: '5' is not an integer; write it without quotes"),
    ('[train]\nasync_save = "true"\n', "train.async_save: 'true' is not a boolean"),
    ("[parallel]\nzero = true\n", "parallel.zero: True is not accepted; choose one of 0, 1"),
    ("", "holds no settings (empty or only comments)"),
])
def test_mistyped_and_empty_config_files_are_refused(tmp_path, text, needle):
    config = tmp_path / "c.toml"
    config.write_text(text)
    rc, _, err = flan("pretrain", str(config), f"--train.run_dir={tmp_path / 'run'}")
    assert rc == 2
    one_error_line(err, str(config), needle)
    assert not (tmp_path / "run").exists() and config.read_text() == text
