"""Issue 20 item 5: resume says what it does. true needs a checkpoint, auto says whether it continues or
starts fresh; a changed shape, row length or batch is refused naming both values; a changed learning rate or
step count goes on with a notice; a damaged newest checkpoint falls back to an intact one with a warning, or
resume_from chooses; a half-written metrics line does not block it; a resumed run equals an uninterrupted one."""
import json

import pytest

from tests.reliability.harness import TRAINED_STEPS, flip, one_error_line, pretrain, snapshot


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_true_without_a_checkpoint_is_refused(tmp_path):
    rc, _, err = pretrain(tmp_path / "never", "--train.steps=2", "--train.resume=true")
    assert rc == 2
    one_error_line(err, "train.resume", str(tmp_path / "never"), "does not exist", "--train.resume=auto")
    assert not (tmp_path / "never").exists()

    killed = tmp_path / "killed"  # a run killed before its first checkpoint: its log must survive
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    before = snapshot(killed)
    rc, _, err = pretrain(killed, "--train.steps=2", "--train.resume=true")
    assert rc == 2
    one_error_line(err, "train.resume", "holds no checkpoint")
    assert snapshot(killed) == before


def test_resume_auto_says_it_starts_fresh(tmp_path):
    rc, _, err = pretrain(tmp_path / "fresh", "--train.steps=1", "--train.resume=auto")
    assert rc == 0 and "train.resume=auto" in err and "starting fresh at step 0" in err
    assert len(losses(tmp_path / "fresh")) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--model.d_model=128", "--model.head_dim=64"], "model.d_model: {step} was trained with 64, this run has 128"),
    (["--data.seq_len=64"], "data.seq_len: {step} was trained with 32, this run has 64"),
    (["--train.batch_size=8"], "train.batch_size: {step} was trained with 4, this run has 8"),
])
def test_a_changed_shape_row_length_or_batch_is_refused(copy_run, flags, needle):
    run = copy_run()
    before = snapshot(run)
    rc, _, err = pretrain(run, "--train.steps=6", "--train.resume=true", *flags)
    assert rc == 2
    one_error_line(err, needle.format(step=run / "checkpoints" / "step-000004"))
    assert snapshot(run) == before


def test_a_changed_learning_rate_goes_on_with_a_notice(copy_run):
    run = copy_run()
    rc, _, err = pretrain(run, "--train.steps=5", "--train.resume=true", "--optim.lr=1e-3")
    assert rc == 0, err
    assert "notice: optim.lr changed since step-000004: 0.002 -> 0.001" in err
    assert "notice: train.steps changed since step-000004: 4 -> 5" in err
    assert len(losses(run)) == 5


def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(copy_run, trained_run):
    run = copy_run()
    flip(run / "checkpoints" / "step-000004" / "model-r00000.safetensors")
    rc, _, err = pretrain(run, f"--train.steps={TRAINED_STEPS}", "--train.resume=true")
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "warning: skipped damaged checkpoint" in line]
    assert len(warning) == 1 and "step-000004" in warning[0] and "fails its checksum" in warning[0]
    assert "resuming from step-000002" in warning[0]
    assert losses(run) == losses(trained_run)  # steps 3-4 redone from step 2: the same as the first time


def test_resume_from_a_chosen_step_past_a_half_written_log_line_equals_the_uninterrupted_run(copy_run, trained_run):
    run = copy_run()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of a line
    rc, _, err = pretrain(run, f"--train.steps={TRAINED_STEPS}", "--train.resume_from=step-2")
    assert rc == 0, err
    assert "resuming from" in err and "step-000002 (step 2)" in err
    assert losses(run) == losses(trained_run)
