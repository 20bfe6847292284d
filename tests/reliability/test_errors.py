"""Issue 20 item 9: one error policy. Every command reports an expected error as one line naming the file,
flag or field, with the documented exit code (2 usage/config, 1 runtime); a traceback only with --debug."""
import pytest

from tests.reliability.harness import SMALL, flan, one_error_line, pretrain, snapshot


def test_pretrain_and_tune_report_missing_data_in_one_line(tmp_path):
    for command in ("pretrain", "tune"):
        rc, _, err = flan(command, "configs/tiny.toml", *SMALL, f"--train.run_dir={tmp_path / command}",
                          f"--data.data_dir={tmp_path / 'no-data'}")
        assert rc == 1
        one_error_line(err, f"flan {command}: error:", str(tmp_path / "no-data"), "--data.data_dir")


def test_debug_shows_the_traceback(tmp_path):
    rc, _, err = flan("pretrain", "configs/tiny.toml", "--debug", f"--data.data_dir={tmp_path / 'no-data'}",
                      f"--train.run_dir={tmp_path / 'r'}")
    assert rc == 1 and "Traceback" in err and "MissingDataError" in err


@pytest.mark.parametrize("argv, code, needles", [
    (["info", "configs/tiny.toml", "--model.n_kv_heads=3"], 2, ["model.n_kv_heads"]),
    (["info", "configs/nope.toml"], 2, ["configs/nope.toml", "config file not found"]),
    (["data", "preview", "nope"], 2, ["unknown dataset 'nope'"]),
])
def test_usage_errors_exit_2(argv, code, needles):
    rc, _, err = flan(*argv)
    assert rc == code
    one_error_line(err, *needles)


def test_a_missing_checkpoint_is_not_called_unfinished(tmp_path):
    rc, _, err = flan("checkpoint", "inspect", str(tmp_path / "nowhere"))
    assert rc == 1
    line = one_error_line(err, str(tmp_path / "nowhere"), "no such checkpoint folder")
    assert "never finished" not in line
    rc, _, err = flan("tune", "configs/tiny.toml", *SMALL, f"--train.init_from={tmp_path / 'nowhere'}",
                      f"--train.run_dir={tmp_path / 'tuned'}")
    assert rc == 2
    one_error_line(err, "train.init_from", "does not exist")
    assert not (tmp_path / "tuned").exists()


def test_file_system_errors_name_the_path(trained_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    before = snapshot(trained_run)
    rc, _, err = flan("checkpoint", "convert", str(trained_run / "checkpoints" / "step-000004"),
                      str(blocker / "out"), "--layout", "tp=2")
    assert rc == 1
    one_error_line(err, str(blocker), "is a file, not a folder")
    assert snapshot(trained_run) == before and blocker.read_text() == "not a folder"


def test_an_unwritable_run_folder_is_found_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = pretrain(blocker / "run", "--train.steps=2")
    assert rc == 2
    one_error_line(err, "train.run_dir", str(blocker / "run"), "cannot be written")
    assert blocker.read_text() == "x"
