"""Sharded checkpoints on one process: round trips, async snapshots, damaged files, refused mismatches, and the
`flan checkpoint` commands. (Layout changes and a rank killed mid-save, on real processes:
tests/engine/parallel/test_sharded_checkpoint.py.)"""
import argparse
import json

import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint_cli import parse_layout
from engine.config import load_config, resolve_auto
from engine.model import build_model
from engine.parallel import Mesh, parallelize
from flan.cli import main

SMALL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.head_dim=16", "--model.d_ff=128", "--model.vocab_size=256", "--data.seq_len=32"]


def config(flags=()):
    return resolve_auto(load_config("configs/tiny.toml", SMALL + list(flags)), cuda_available=False)


def trained(flags=(), steps: int = 2, seed: int = 0):
    """A small model's (one-device) layout and optimizer after `steps` updates with seeded gradients."""
    cfg = config(flags)
    layout, optimizer = fresh(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in layout.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
    return cfg, layout, optimizer


def fresh(cfg, seed: int = 99):
    layout = parallelize(build_model(cfg.model, seed), cfg, Mesh())
    return layout, layout.build_optimizer()


def assert_same_state(a_model, a_opt, b_model, b_opt):
    for (name, p), q in zip(a_model.named_parameters(), b_model.parameters()):
        assert torch.equal(p, q), name
        sa, sb = a_opt.state[p], b_opt.state[q]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)


@pytest.mark.parametrize("optim", ["adamw", "adafactor"])
def test_round_trip_restores_weights_optimizer_rng_and_meta(tmp_path, optim):
    cfg, layout, optimizer = trained([f"--optim.name={optim}"])
    torch.manual_seed(7)
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=2).save(2, layout, optimizer, {"config": cfg.to_dict(),
                                                                                  "data": {"row": 5}})
    expected_random = torch.rand(3)
    model2, optimizer2 = fresh(cfg)
    meta = ckpt.load_checkpoint(path, model2, optimizer2)
    assert meta["step"] == 2 and meta["data"] == {"row": 5} and meta["layout"] == {"dp": 1, "pp": 1, "tp": 1}
    assert_same_state(layout, optimizer, model2, optimizer2)
    assert torch.equal(torch.rand(3), expected_random)  # the RNG continues where the saved run was
    index = json.loads((path / "index.json").read_text())
    wq = index["tensors"]["layers.0.attn.wq.weight"]
    assert wq["shape"] == [64, 64] and wq["dtype"] == "float32" and wq["pieces"][0]["box"] == [[0, 64], [0, 64]]
    assert "output.weight" not in index["tensors"]  # tied: one global tensor
    for f in path.iterdir():  # no pickle anywhere
        assert not f.read_bytes().startswith(b"\x80"), f


def test_async_save_snapshots_the_weights_and_the_next_save_waits(tmp_path):
    cfg, layout, optimizer = trained()
    saver = ckpt.Checkpointer(tmp_path, Mesh(), keep=1, async_save=True)
    snapshot = [p.detach().clone() for p in layout.parameters()]
    saver.save(1, layout, optimizer, {"config": cfg.to_dict()})
    with torch.no_grad():  # training goes on while the thread writes
        for p in layout.parameters():
            p.add_(1.0)
    saver.save(2, layout, optimizer, {"config": cfg.to_dict()})  # joins the first
    saver.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002"]  # keep=1 pruned after completion
    one = ckpt.load_model_state(tmp_path / "checkpoints" / "step-000002")
    for (name, p), old in zip(layout.named_parameters(), snapshot):
        assert torch.equal(one[name], p.detach()) and not torch.equal(one[name], old)


def test_damaged_checkpoints_name_the_file_and_the_tensor(tmp_path):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=3).save(2, layout, optimizer, {"config": cfg.to_dict()})
    shard = path / "model-r00000.safetensors"
    data = bytearray(shard.read_bytes())

    data[-40] ^= 0xFF  # one flipped byte in the last tensor's values
    shard.write_bytes(bytes(data))
    model2, optimizer2 = fresh(cfg)
    with pytest.raises(ckpt.CheckpointError, match=r"model-r00000.safetensors: tensor '.*' \(key .*\) fails its "
                                                   r"checksum"):
        ckpt.load_checkpoint(path, model2, optimizer2)

    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ckpt.CheckpointError, match=r"model-r00000.safetensors: \d+ bytes but \d+ were written, so "
                                                   r"the file is truncated .*reading tensor 'tok_embeddings.weight'"):
        ckpt.load_checkpoint(path, model2, optimizer2)

    shard.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model-r00000.safetensors: missing; index.json lists it for "
                                                   r"tensor 'tok_embeddings.weight'"):
        ckpt.load_model_state(path)

    (path / "COMPLETE").unlink()
    assert ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no COMPLETE marker"):
        ckpt.load_checkpoint(path, model2, optimizer2)


def test_shapes_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    wider, _ = fresh(config(["--model.d_ff=96"]))
    with pytest.raises(ckpt.CheckpointError, match=r"model-r00000.safetensors: tensor 'layers.0.mlp.w_gate.weight' "
                                                   r"has global shape \(128, 64\) but the configured model needs "
                                                   r"\(96, 64\)"):
        ckpt.load_checkpoint(path, wider, None)
    deeper, _ = fresh(config(["--model.n_layers=3"]))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['layers.2.attn.wk.weight'"):
        ckpt.load_checkpoint(path, deeper, None)
    weights_only = ckpt.save_weights(tmp_path / "w", 0, layout.model.state_dict(), {"config": cfg.to_dict()}, keep=1)
    with pytest.raises(ckpt.CheckpointError, match="holds no optimizer state"):
        ckpt.load_checkpoint(weights_only, *fresh(cfg))


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_inspect_and_convert_to_another_layout_and_back(tmp_path, capsys):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    code, out, _ = run_cli(["checkpoint", "inspect", str(path), "--verify"], capsys)
    assert code == 0 and "step 2, layout dp=1 pp=1 tp=1 (1 ranks)" in out and "checksums verified" in out
    assert "layers.1.mlp.w_down.weight" in out and "(64, 128)" in out

    sharded = tmp_path / "tp2pp2"
    code, out, _ = run_cli(["checkpoint", "convert", str(path), str(sharded), "--layout", "dp=1,pp=2,tp=2"], capsys)
    assert code == 0, out
    info = json.loads(run_cli(["checkpoint", "inspect", str(sharded), "--json"], capsys)[1])
    assert info["layout"] == {"dp": 1, "pp": 2, "tp": 2} and info["world_size"] == 4
    pieces = {t["name"]: t["pieces"] for t in info["tensors"]}
    assert pieces["layers.0.attn.wq.weight"] == 2 and pieces["layers.0.attn_norm.weight"] == 1
    back = tmp_path / "single"
    assert run_cli(["checkpoint", "convert", str(sharded), str(back), "--layout", "dp=1,pp=1,tp=1"], capsys)[0] == 0
    model2, optimizer2 = fresh(cfg)
    ckpt.load_checkpoint(back, model2, optimizer2)
    assert_same_state(layout, optimizer, model2, optimizer2)

    code, _, err = run_cli(["checkpoint", "convert", str(path), str(back), "--layout", "tp=2"], capsys)
    assert code == 2 and "already exists" in err
    with pytest.raises(argparse.ArgumentTypeError, match="--layout 'tp=two'"):
        parse_layout("tp=two")


def test_another_optimizer_is_refused(tmp_path):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    other_cfg = config(["--optim.name=adafactor"])
    with pytest.raises(ckpt.CheckpointError, match="holds adamw state but this run's optimizer is adafactor; "
                                                   "resume with --optim.name=adamw"):
        ckpt.load_checkpoint(path, *fresh(other_cfg))


def _flip(path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_byte_read_is_verified_partial_slices_and_rng_included(tmp_path):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=3).save(2, layout, optimizer, {"config": cfg.to_dict()})
    _flip(path / "model-r00000.safetensors")  # inside the last stored tensor's values
    index = ckpt.load_meta(path)
    reader = ckpt.Reader(path, index)
    # The first half of every weight, as a tp rank of another layout reads it: the piece holding the flipped
    # byte fails its checksum although the half read may not contain that byte.
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        for name, entry in index["tensors"].items():
            if entry["kind"] == "model":
                reader.region(name, tuple((0, max(1, n // 2)) for n in entry["shape"]), None)

    again = ckpt.Checkpointer(tmp_path / "rng", Mesh(), keep=3).save(2, layout, optimizer, {"config": cfg.to_dict()})
    _flip(again / ckpt.rng_file(0))
    with pytest.raises(ckpt.CheckpointError, match=r"rng-r00000.safetensors: tensor 'rng' \(key 'torch_cpu'\) fails "
                                                   "its checksum"):
        ckpt.load_checkpoint(again, *fresh(cfg))


def test_convert_refuses_a_corrupted_checkpoint_and_writes_nothing(tmp_path, capsys):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    _flip(path / "model-r00000.safetensors")
    out = tmp_path / "converted"
    code, _, err = run_cli(["checkpoint", "convert", str(path), str(out), "--layout", "tp=2"], capsys)
    assert code == 1 and "fails its checksum" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-converted*"))
    code, _, err = run_cli(["checkpoint", "inspect", str(path), "--verify"], capsys)
    assert code == 1 and "fails its checksum" in err


@pytest.mark.parametrize("field, value, message", [
    ("file", "../../../etc/passwd", r"file name '\.\./\.\./\.\./etc/passwd' is not a plain file name"),
    ("file", "/etc/passwd", r"file name '/etc/passwd' is not a plain file name"),
    ("dtype", "nn", r"dtype 'nn'; accepted: float32"),
    ("dtype", "Tensor", r"dtype 'Tensor'; accepted"),
])
def test_index_paths_and_dtypes_are_confined(tmp_path, field, value, message):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path, Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    index = json.loads((path / ckpt.INDEX).read_text())
    entry = next(iter(index["tensors"].values()))
    if field == "file":
        entry["pieces"][0]["file"] = value
    else:
        entry["dtype"] = value
    (path / ckpt.INDEX).write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_checkpoint(path, *fresh(cfg))


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    cfg, layout, optimizer = trained()
    path = ckpt.Checkpointer(tmp_path / "run", Mesh(), keep=1).save(2, layout, optimizer, {"config": cfg.to_dict()})
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model-r00000.safetensors").rename(outside)
    (path / "model-r00000.safetensors").symlink_to(outside)
    with pytest.raises(ckpt.CheckpointError, match=r"a symlink leading out of the checkpoint folder"):
        ckpt.load_model_state(path)
