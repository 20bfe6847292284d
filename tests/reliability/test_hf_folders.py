"""Issue 20 item 4: HF folders never lose or mix data. `flan export-hf` into a folder holding files refuses
(exit 2, naming the folder and --force) and changes nothing; with --force the folder ends holding exactly the
new export (plus the user's own non-model files), whose logits are the checkpoint's; a failed export leaves the
old folder as it was. `flan import-hf` into a folder holding a run refuses and changes nothing."""
import json

import pytest
import torch

from tests.reliability.harness import flan, one_error_line, snapshot

transformers = pytest.importorskip("transformers", reason="transformers is a test extra (requirements-test.txt)")

ENOSPC_IN_TOKENIZER = """
import errno, sys
from engine.hf import export


def full(*args):  # the disk fills up after the weights were written, before the tokenizer
    raise OSError(errno.ENOSPC, "No space left on device", "tokenizer.json")


export.hf_tokenizer = full
from flan.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def fresh_export(trained_run, tmp_path_factory):
    """The shared run exported into a new folder (what --force must leave, and a folder to import)."""
    out = tmp_path_factory.mktemp("export") / "hf"
    rc, _, err = flan("export-hf", str(trained_run), str(out))
    assert rc == 0, err
    return out


def earlier_export(folder):
    """A folder as an older, two-shard export plus the user's notes would leave it."""
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    for i in (1, 2):
        (folder / f"model-0000{i}-of-00002.safetensors").write_bytes(b"old weights %d" % i)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    return folder


def test_export_into_a_folder_holding_files_is_refused_and_changes_nothing(trained_run, tmp_path):
    out = earlier_export(tmp_path / "hf")
    before = snapshot(out)
    rc, _, err = flan("export-hf", str(trained_run), str(out))
    assert rc == 2
    one_error_line(err, str(out), "--force")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it


def test_force_leaves_exactly_the_new_export_with_the_models_logits(trained_run, fresh_export, tmp_path):
    from engine.batch import Batch
    from engine.checkpoint import apply_model_state, latest_checkpoint, load_meta, load_model_state
    from engine.config import config_from_dict
    from engine.model import build_model

    out = earlier_export(tmp_path / "hf")
    rc, _, err = flan("export-hf", str(trained_run), str(out), "--force")
    assert rc == 0, err
    assert set(snapshot(out)) == set(snapshot(fresh_export)) | {"README.md"}  # old shards and index gone
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    step = latest_checkpoint(trained_run)
    cfg = config_from_dict(load_meta(step)["config"])
    ours = build_model(cfg.model, seed=0).eval()
    apply_model_state(ours, load_model_state(step), step)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(Batch(tokens)), rtol=1e-5, atol=1e-5)


def test_a_failed_forced_export_leaves_the_old_folder_as_it_was(trained_run, tmp_path):
    out = earlier_export(tmp_path / "hf")
    before = snapshot(out)
    script = tmp_path / "full_disk.py"
    script.write_text(ENOSPC_IN_TOKENIZER)
    rc, _, err = flan("export-hf", str(trained_run), str(out), "--force", script=script)
    assert rc == 1
    one_error_line(err, "tokenizer.json", "no space left")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full_disk.py", "hf"]


def test_import_into_a_folder_holding_a_run_is_refused_and_changes_nothing(fresh_export, copy_run, tmp_path):
    run = copy_run()
    before = snapshot(run)
    rc, _, err = flan("import-hf", str(fresh_export), str(run))
    assert rc == 2
    one_error_line(err, str(run), "not empty")
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
