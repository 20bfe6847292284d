"""Config loading: TOML + flags, and one clear error for every kind of mistake."""
import pytest

from engine.config import KERNEL_FIELDS, ConfigError, layout_problem, load_config, resolve_auto, unresolved, with_kernels


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_presets_load():
    for name in ("tiny", "gpu-125m", "gpu-1.3b", "flan-137b"):
        load_config(f"configs/{name}.toml")


def test_flags_override_the_file_with_types(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 7\n"),
                      ["--train.steps=9", "--parallel.sp=true", "--optim.lr=1e-3", "--model.mlp=geglu"])
    assert cfg.train.steps == 9 and cfg.parallel.sp is True and cfg.optim.lr == 1e-3 and cfg.model.mlp == "geglu"


@pytest.mark.parametrize("text,flags,expected", [
    ("[model]\nwidth = 3\n", [], r"c\.toml: unknown field model\.width; fields of \[model\]: vocab_size"),
    ("[modle]\nd_model = 3\n", [], r"unknown section \[modle\]; known sections: model, parallel"),
    ("[model]\nd_model = 'big'\n", [], r"c\.toml: model\.d_model: 'big' is not an integer"),
    ("[model]\nn_heads = 8\nn_kv_heads = 3\n", [], r"model\.n_kv_heads: 3 does not divide model\.n_heads=8; "
                                                   r"choose n_kv_heads among \[1, 2, 4, 8\]"),
    ("", ["--parallel.tp=3"], r"flag.*parallel\.tp: 3 does not divide model\.n_heads=8"),
    ("", ["--model.mlp=relu"], r"flag --model\.mlp: model\.mlp: 'relu' is not accepted; choose one of 'swiglu'"),
    ("", ["--train.steps=ten"], r"flag --train\.steps: train\.steps: 'ten' is not an integer"),
    ("", ["--steps=3"], r"overrides are written --section\.field=value"),
    ("", ["--parallel.pp=2", "--parallel.virtual_stages=2"], r"virtual_stages=2 needs --parallel\.schedule=interleaved"),
    ("", ["--parallel.pp=4", "--parallel.schedule=interleaved", "--parallel.virtual_stages=2",
          "--parallel.microbatches=6"], r"parallel\.microbatches=6: .* choose a multiple of 4"),
    ("[train]\nbatch_size = 10\ngrad_accum = 3\n", [], r"train\.grad_accum: 3 does not divide train\.batch_size=10"),
    ("model = 3\n", [], r"top-level key 'model' must be a \[section\] table"),
    ("[model\n", [], r"not valid TOML"),
    # settings that used to be caught late (or never): each names its field before any work
    ("", ["--train.log_every=0"], r"train\.log_every: is 0; it must be at least 1"),
    ("", ["--train.val_batches=0"], r"train\.val_batches: is 0; validation .* needs at least 1 batch"),
    ("", ["--eval.batch_size=0"], r"eval\.batch_size: is 0"),
    ("", ["--optim.lr=nan"], r"optim\.lr: is nan; accepted: a positive number"),
    ("", ["--optim.beta1=2"], r"optim\.beta1: is 2\.0; accepted: 0 <= beta1 < 1"),
    ("", ["--parallel.dp=3"], r"train\.batch_size: 16 rows do not split over parallel\.dp=3"),
    ("", ["--parallel.dp=1", "--parallel.pp=2", "--parallel.microbatches=3"],
     r"parallel\.microbatches: train\.batch_size=16 does not split into dp=1 x train\.grad_accum=1 x"),
    ("[train]\nsteps = \"5\"\n", [], r"train\.steps: '5' is not an integer; write it without quotes"),
    ("[train]\nasync_save = \"true\"\n", [], r"train\.async_save: 'true' is not a boolean; write true or false"),
    ("[optim]\nlr = \"1e-3\"\n", [], r"optim\.lr: '1e-3' is not a number; write it without quotes"),
    ("[parallel]\nzero = true\n", [], r"parallel\.zero: True is not accepted; choose one of 0, 1"),
    ("# nothing but a comment\n", [], r"c\.toml: holds no settings"),
])
def test_mistakes_fail_with_one_clear_message(tmp_path, text, flags, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text or "[train]\nsteps = 16\n"), flags)  # "": a file of one setting


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no settings \(empty or only comments\); start from a preset"):
        load_config(write(tmp_path, ""))


def test_missing_file_says_where_presets_are(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found; presets live in configs/"):
        load_config(tmp_path / "nope.toml")


def test_cli_reports_config_errors_without_a_traceback(capsys):
    from flan.cli import main

    assert main(["info", "configs/tiny.toml", "--model.n_kv_heads=3"]) == 2
    assert "n_kv_heads: 3 does not divide" in capsys.readouterr().err


@pytest.mark.parametrize("gpu, want", [(False, ("cpu", "fp32", "torch", "torch")),
                                       (True, ("cuda", "bf16", "triton", "fused"))])
def test_auto_is_resolved_once_for_the_device(gpu, want):
    cfg = load_config("configs/tiny.toml")
    assert unresolved(cfg) == ["train.device", "train.precision", "model.attention", "model.loss"]
    resolved = resolve_auto(cfg, cuda_available=gpu)
    t, m = resolved.train, resolved.model
    assert (t.device, t.precision, m.attention, m.loss) == want and unresolved(resolved) == []
    assert cfg.train.device == "auto"  # the config as written is left alone (checkpoints store it)
    chosen = resolve_auto(load_config("configs/tiny.toml", ["--model.attention=triton", "--train.precision=fp32"]),
                          cuda_available=False)
    assert (chosen.model.attention, chosen.train.precision) == ("triton", "fp32")  # explicit choices stay


def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="train.device: cuda, but torch sees no CUDA device"):
        resolve_auto(load_config("configs/tiny.toml", ["--train.device=cuda"]), cuda_available=False)


def test_layout_rules_live_in_one_function():
    m = load_config("configs/tiny.toml").model  # 4 heads, 2 kv heads, d_ff 704, vocab 4096, 4 layers
    assert layout_problem(m, 2, 4) is None
    assert layout_problem(m, 4) == ("parallel.tp", "4 does not divide model.n_kv_heads=2; choose tp among [1, 2]")
    assert layout_problem(m, 1, 3, 2)[0] == "parallel.pp"
    with pytest.raises(ConfigError, match=r"parallel\.pp: pp x virtual_stages = 6 exceeds model\.n_layers=4"):
        load_config("configs/tiny.toml", ["--parallel.pp=3", "--parallel.virtual_stages=2",
                                          "--parallel.schedule=interleaved", "--parallel.microbatches=3"])


def test_runs_from_a_checkpoint_keep_its_shape_and_take_their_own_kernels():
    """with_kernels is the one rule prompt-tune and eval use: a GPU-trained checkpoint runs on a CPU."""
    from flan.eval_cli import eval_run_config

    stored = load_config("configs/tiny.toml", ["--model.d_model=128", "--model.attention=triton",
                                               "--model.attention_tiles=tma", "--model.attention_backward=fused",
                                               "--model.loss=fused"])
    here = load_config("configs/tiny.toml", ["--model.attention=torch", "--model.loss=torch"])
    merged = with_kernels(stored.model, here.model)
    assert merged.d_model == 128 and [getattr(merged, f) for f in KERNEL_FIELDS] == ["torch", "pointers", "split",
                                                                                   "torch"]
    run = eval_run_config(stored, here)
    assert run.model == merged
