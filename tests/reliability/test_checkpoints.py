"""Issue 20 items 1 and 2: every byte a checkpoint load uses is verified (also when another layout reads only
slices of a stored piece, and the RNG shard); convert refuses corrupted input; paths and dtypes read from
index.json are confined. Each refusal is one line naming the file, and changes nothing."""
import json

import pytest

from tests.reliability.harness import SMALL, flan, flip, one_error_line, pretrain, snapshot, torchrun


def test_a_flipped_byte_stops_a_resume_under_another_layout(copy_run):
    """Two tp ranks each read half of every stored piece of a one-device checkpoint: a half without the
    flipped byte fails its piece's checksum all the same."""
    run = copy_run()
    flip(run / "checkpoints" / "step-000004" / "model-r00000.safetensors")
    before = snapshot(run)
    rc, out, err = torchrun(2, "pretrain", "configs/tiny.toml", *SMALL, f"--train.run_dir={run}", "--train.steps=6",
                            "--parallel.tp=2", "--train.resume_from=step-4")
    assert rc != 0
    lines = [line for line in (out + err).splitlines() if "flan pretrain: error:" in line]
    assert lines and all("step-000004/model-r00000.safetensors" in line and "fails its checksum" in line
                         for line in lines), out + err
    assert snapshot(run) == before


def test_a_corrupted_rng_shard_is_refused(copy_run):
    run = copy_run()
    flip(run / "checkpoints" / "step-000004" / "rng-r00000.safetensors")
    before = snapshot(run)
    rc, _, err = pretrain(run, "--train.steps=6", "--train.resume_from=step-4")
    assert rc == 1
    one_error_line(err, "step-000004/rng-r00000.safetensors", "fails its checksum")
    assert snapshot(run) == before


def test_convert_refuses_corrupted_input_and_inspect_verify_finds_it(copy_run, tmp_path):
    run = copy_run()
    step = run / "checkpoints" / "step-000004"
    flip(step / "optim-r00000.safetensors")
    before = snapshot(run)
    rc, _, err = flan("checkpoint", "convert", str(step), str(tmp_path / "out"), "--layout", "tp=2")
    assert rc == 1
    one_error_line(err, "optim-r00000.safetensors", "fails its checksum")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-out*"))
    rc, _, err = flan("checkpoint", "inspect", str(step), "--verify")
    assert rc == 1
    one_error_line(err, "optim-r00000.safetensors", "fails its checksum")
    assert snapshot(run) == before


@pytest.mark.parametrize("damage, needle", [
    ("dotdot", "file name '../../../../etc/passwd' is not a plain file name"),
    ("absolute", "file name '/etc/passwd' is not a plain file name"),
    ("dtype", "dtype 'Tensor'; accepted: float32"),
    ("symlink", "a symlink leading out of the checkpoint folder"),
])
def test_paths_and_dtypes_from_index_json_are_confined(copy_run, tmp_path, damage, needle):
    run = copy_run()
    step = run / "checkpoints" / "step-000004"
    index = json.loads((step / "index.json").read_text())
    entry = index["tensors"]["tok_embeddings.weight"]
    if damage == "symlink":
        outside = tmp_path / "outside.safetensors"
        (step / "model-r00000.safetensors").rename(outside)
        (step / "model-r00000.safetensors").symlink_to(outside)
    elif damage == "dtype":
        entry["dtype"] = "Tensor"
    else:
        name = "../../../../etc/passwd" if damage == "dotdot" else "/etc/passwd"
        entry["pieces"][0]["file"] = name
        index["files"][name] = index["files"]["model-r00000.safetensors"]
    (step / "index.json").write_text(json.dumps(index))
    before = snapshot(run)
    rc, _, err = flan("checkpoint", "inspect", str(step), "--verify")
    assert rc == 1
    one_error_line(err, needle)
    assert snapshot(run) == before
