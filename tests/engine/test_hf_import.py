"""import-hf on Llama-2-style (SentencePiece BPE + tokenizer.json, fp32 shards) and Llama-3-style
(tokenizer.json only, rope_scaling llama3, bf16) folders made locally: our logits equal transformers', the
tokenizer is checked, any layout's shards are written directly, and bad folders are refused by name."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hf_folders import built

from engine.batch import Batch
from engine.checkpoint import apply_model_state, load_meta, load_model_state
from engine.config import config_from_dict
from engine.hf import HFError, import_hf, model_config_from_llama
from engine.hf.tokenizer_check import BASIC_PROBES
from engine.model import build_model
from engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is a test extra (requirements-test.txt)")
TRUST = {"llama2": "json", "llama3": "auto"}  # llama2's two tokenizer files disagree (test below)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data):
    return {k: built(k, tmp_path_factory, shared_data / "corpus") for k in ("llama2", "llama3")}


@pytest.fixture(scope="module")
def llama2_import(folders, tmp_path_factory):
    """import_hf(llama2, trust=json) in one process for a layout ("tp=2"; "" for one device), made once per
    module: the references the layout tests compare against (read-only)."""
    made: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            degrees = dict((k, int(v)) for k, v in (p.split("=") for p in layout.split(",") if p))
            made[layout] = import_hf(folders["llama2"], tmp_path_factory.mktemp("llama2-import") / "run",
                                     trust="json", layout=degrees)
        return made[layout]
    return get


def our_model(step):
    cfg = config_from_dict(load_meta(step)["config"])
    model = build_model(cfg.model, seed=0)
    apply_model_state(model, load_model_state(step), step)
    return model.eval(), cfg


def logits_of(model, vocab: int, hf: bool = False) -> torch.Tensor:
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits if hf else model(Batch(tokens))


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_imported_logits_equal_transformers(kind, folders, tmp_path):
    step = import_hf(folders[kind], tmp_path / "run", trust=TRUST[kind])
    model, cfg = our_model(step)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders[kind], dtype=torch.float32).eval()
    ours = logits_of(model, cfg.model.vocab_size)
    torch.testing.assert_close(ours, logits_of(hf, cfg.model.vocab_size, hf=True), rtol=1e-5, atol=1e-5)
    assert cfg.model.tie_embeddings == (kind == "llama3")
    if kind == "llama3":  # the scaling is really in use: without it the logits move
        assert cfg.model.rope_scaling == "llama3" and cfg.model.rope_original_max_len == 16
        cfg.model.rope_scaling = "none"
        plain = build_model(cfg.model, seed=0)
        plain.load_state_dict(model.state_dict())
        assert (logits_of(plain.eval(), cfg.model.vocab_size) - ours).abs().max() > 1e-3
    tok = Tokenizer.load(cfg.data.tokenizer)  # the run's tokenizer gives transformers' ids, BOS included
    auto = transformers.AutoTokenizer.from_pretrained(folders[kind])
    assert tok.add_bos and tok.kind == "tokenizers"
    for text in BASIC_PROBES:
        assert tok.bos_prefix + tok.encode(text) == auto.encode(text), text


def test_disagreeing_tokenizer_files_stop_the_import(folders, tmp_path):
    with pytest.raises(HFError, match="tokenizer.model and tokenizer.json disagree on ' leading space'.*--trust"):
        import_hf(folders["llama2"], tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written
    step = import_hf(folders["llama2"], tmp_path / "sp", trust="model")
    tok = Tokenizer.load(load_meta(step)["config"]["data"]["tokenizer"])
    assert tok.kind == "sentencepiece-bpe" and tok.add_bos and tok.bos_id == 1


def test_tp2_import_writes_shards_that_load_to_the_same_logits(llama2_import):
    whole, split = llama2_import(""), llama2_import("tp=2")
    index = load_meta(split)
    assert index["layout"] == {"dp": 1, "pp": 1, "tp": 2} and index["world_size"] == 2
    assert sorted(p.name for p in split.glob("model-*")) == ["model-r00000.safetensors", "model-r00001.safetensors"]
    wq = index["tensors"]["layers.0.attn.wq.weight"]["pieces"]
    assert sorted(p["box"][0] for p in wq) == [[0, 16], [16, 32]]  # column-parallel: rows split in two
    a, b = our_model(whole)[0], our_model(split)[0]
    torch.testing.assert_close(logits_of(a, 512), logits_of(b, 512), rtol=0, atol=0)
    assert config_from_dict(index["config"]).parallel.tp == 2


def _tp_logits(step: str) -> list:
    """Rank's view: the imported tp=2 shards loaded into a real tensor-parallel layout (gloo), its logits."""
    from engine import checkpoint as ckpt
    from engine.config import resolve_auto
    from engine.parallel import init_mesh, parallelize

    cfg = resolve_auto(config_from_dict(load_meta(step)["config"]), cuda_available=False)
    layout = parallelize(build_model(cfg.model, 7), cfg, init_mesh(cfg))
    ckpt.load_checkpoint(step, layout, None)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return layout.model(Batch(tokens)).tolist()


def test_tp2_shards_load_into_a_tp2_layout_with_transformers_logits(folders, llama2_import):
    sys.path.insert(0, str(Path(__file__).parent / "parallel"))
    from launch import launch

    split = llama2_import("tp=2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["llama2"], dtype=torch.float32).eval()
    expected = logits_of(hf, 512, hf=True)
    for logits in launch(_tp_logits, 2, str(split)):
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=1e-5, atol=1e-5)


def test_dtype_is_what_was_asked(folders, tmp_path):
    step = import_hf(folders["llama3"], tmp_path / "run", dtype="bfloat16")
    index = load_meta(step)
    assert {e["dtype"] for e in index["tensors"].values()} == {"bfloat16"}
    from safetensors.torch import load_file

    source = load_file(str(folders["llama3"] / "model.safetensors"))
    state = load_model_state(step)
    assert torch.equal(state["tok_embeddings.weight"], source["model.embed_tokens.weight"])
    with pytest.raises(HFError, match="--dtype 'int8'"):
        import_hf(folders["llama3"], tmp_path / "bad", dtype="int8")


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_weight_map_paths_stay_in_the_folder(where, folders, tmp_path):
    folder = _copy(folders["llama2"], tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00006.safetensors").read_bytes())
    if where == "link.safetensors":
        (folder / where).symlink_to(tmp_path / "outside.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = where
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFError, match="outside the model folder|leaves the model folder"):
        import_hf(folder, tmp_path / "run", trust="json")


def test_import_refuses_a_folder_holding_files(folders, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(HFError, match="already exists and is not empty"):
        import_hf(folders["llama3"], run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_unsupported_variants_are_refused_by_name(tmp_path):
    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    assert model_config_from_llama(base, tmp_path).head_dim == 8
    linear = model_config_from_llama(dict(base, rope_scaling={"rope_type": "linear", "factor": 4.0}), tmp_path)
    assert (linear.rope_scaling, linear.rope_factor) == ("linear", 4.0)
    assert model_config_from_llama(dict(base, model_type="mistral", sliding_window=None), tmp_path).n_layers == 1
    with pytest.raises(HFError, match="sliding_window=4096"):
        model_config_from_llama(dict(base, model_type="mistral", sliding_window=4096), tmp_path)
    with pytest.raises(HFError, match="rope scaling 'yarn'"):
        model_config_from_llama(dict(base, rope_scaling={"rope_type": "yarn"}), tmp_path)
    with pytest.raises(HFError, match="attention_bias=true"):
        model_config_from_llama(dict(base, attention_bias=True), tmp_path)
    with pytest.raises(HFError, match="model_type is 'qwen2'"):
        model_config_from_llama(dict(base, model_type="qwen2"), tmp_path)


def test_linear_rope_scaling_matches_transformers(tmp_path, folders):
    folder = _copy(folders["llama3"], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 3.0, "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    model, ours_cfg = our_model(import_hf(folder, tmp_path / "run"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ours_cfg.model.rope_scaling == "linear"
    torch.testing.assert_close(logits_of(model, 512), logits_of(hf, 512, hf=True), rtol=1e-5, atol=1e-5)


def test_inputs_start_with_bos_where_the_model_adds_it(folders, tmp_path):
    from flan.packing import encode_pair, input_window
    from flan.scorer import prompt_ids

    assert input_window(list(range(10, 20)), 4, 1, add_bos=True) == [1, 17, 18, 19]  # BOS kept when truncating
    assert input_window([], 4, 1, add_bos=True) == [1] and input_window([5], 1, 1, add_bos=True) == [1]
    step = import_hf(folders["llama3"], tmp_path / "run")
    tok = Tokenizer.load(load_meta(step)["config"]["data"]["tokenizer"])
    auto = transformers.AutoTokenizer.from_pretrained(folders["llama3"])
    assert prompt_ids(tok, ["Is it true?"], 64)[0] == [auto.encode("Is it true?")]
    assert encode_pair(tok, "Is it true?", "yes", input_len=64, target_len=8).tokens[0] == tok.bos_id


def test_cli_import_refusal_and_eval_hf(folders, tmp_path, capsys):
    from flan.cli import main

    assert main(["import-hf", str(folders["llama2"]), str(tmp_path / "run")]) == 2
    assert "--trust-tokenizer" in capsys.readouterr().err
    assert main(["eval", "configs/tiny.toml", "--hf", str(folders["llama3"]), "--datasets", "rte", "--limit", "4",
                 "--templates", "0", "--out", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert "rte" in json.dumps(scores) and "tuned" in json.dumps(scores)


def _import_on_rank(folder: str, run_dir: str, layout: dict, trust: str):
    """One torchrun rank's `flan import-hf`: its step folder, or the message of the HFError it stopped with."""
    try:
        return str(import_hf(folder, run_dir, trust=trust, layout=layout, world=2))
    except HFError as e:
        return f"HFError: {e}"


def _stored_tensors(step) -> dict:
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) for f in sorted(step.glob("model-*.safetensors"))}


@pytest.mark.parametrize("layout", ["tp=2", "pp=2"])
def test_two_ranks_write_the_shards_of_one_process_layout_import(layout, folders, llama2_import, tmp_path):
    """Under torchrun each rank writes its own files; file for file they hold the values the one-process
    `--layout` import writes, and they load to the one-process import's logits."""
    sys.path.insert(0, str(Path(__file__).parent / "parallel"))
    from launch import launch

    degrees = {layout[:2]: 2}
    steps = launch(_import_on_rank, 2, str(folders["llama2"]), str(tmp_path / "ranks"), degrees, "json")
    assert steps == [str(tmp_path / "ranks" / "checkpoints" / "step-000000")] * 2
    ranks, alone = Path(steps[0]), llama2_import(layout)
    index, expected = load_meta(ranks), load_meta(alone)
    assert index["world_size"] == 2 and index["layout"] == expected["layout"]
    assert index["tensors"] == expected["tensors"]  # same pieces, boxes and checksums
    mine, theirs = _stored_tensors(ranks), _stored_tensors(alone)
    assert list(mine) == list(theirs) == ["model-r00000.safetensors", "model-r00001.safetensors"]
    for file, tensors in mine.items():
        assert tensors.keys() == theirs[file].keys()
        assert all(torch.equal(t, theirs[file][key]) for key, t in tensors.items()), file
    torch.testing.assert_close(logits_of(our_model(ranks)[0], 512), logits_of(our_model(llama2_import(""))[0], 512),
                               rtol=0, atol=0)


def test_a_refusal_on_rank_0_stops_every_rank_and_leaves_nothing(folders, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "parallel"))
    from launch import launch

    # Only rank 0 checks the tokenizer; llama2's two files disagree, so it refuses and rank 1 must not wait.
    first, second = launch(_import_on_rank, 2, str(folders["llama2"]), str(tmp_path / "run"), {"tp": 2}, "auto",
                           timeout=60)
    assert first.startswith("HFError") and "--trust-tokenizer" in first
    assert second.startswith("HFError") and "another rank stopped the import" in second
    assert not (tmp_path / "run").exists()
    wrong = launch(_import_on_rank, 2, str(folders["llama2"]), str(tmp_path / "run"), {"tp": 4}, "json")
    assert all("--layout dp=1,pp=1,tp=4: 4 ranks, but torchrun started 2 processes" in m for m in wrong)


def test_a_private_import_on_one_torchrun_rank_writes_everything(folders, tmp_path, monkeypatch):
    """`flan eval --hf` under torchrun: each rank imports into its own scratch folder (world=1), so rank 1
    writes the whole import itself, tokenizer and config included."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    step = import_hf(folders["llama3"], tmp_path / "run")
    assert load_meta(step)["world_size"] == 1 and (tmp_path / "run" / "config.toml").is_file()
    assert Tokenizer.load(load_meta(step)["config"]["data"]["tokenizer"]).kind == "tokenizers"


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_an_imported_folder_scores_tunes_and_exports_back_with_equal_logits(kind, folders, tmp_path):
    """The issue's whole path as a user types it: import-hf, eval, tune from the import (init_from), eval the
    tuned run, export-hf; the exported folder's transformers logits equal the tuned checkpoint's own."""
    from engine.checkpoint import latest_checkpoint
    from flan.cli import main

    run, tuned = tmp_path / "run", tmp_path / "tuned"
    assert main(["import-hf", str(folders[kind]), str(run), "--trust-tokenizer", TRUST[kind]]) == 0
    config = str(run / "config.toml")
    short = ["--train.steps=2", "--train.batch_size=2", "--optim.warmup_steps=0", "--train.val_every=0",
             "--train.ckpt_every=0", "--data.seq_len=64", "--data.input_len=48", "--data.target_len=16"]
    evaluate = ["--datasets", "rte", "--limit", "4", "--templates", "0", "--base", "none"]
    assert main(["eval", config, "--checkpoint", str(run), *evaluate, "--out", str(tmp_path / "eval0")]) == 0
    assert main(["tune", config, f"--train.init_from={run}", f"--train.run_dir={tuned}", *short]) == 0
    assert main(["eval", config, "--checkpoint", str(tuned), *evaluate, "--out", str(tmp_path / "eval1")]) == 0
    step = latest_checkpoint(tuned)
    before, after = load_model_state(latest_checkpoint(run)), load_model_state(step)
    assert any(not torch.equal(before[k].float(), after[k].float()) for k in before)  # tuning moved the weights
    assert main(["export-hf", str(tuned), str(tmp_path / "hf")]) == 0
    ours, cfg = our_model(step)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits_of(hf, cfg.model.vocab_size, hf=True), logits_of(ours, cfg.model.vocab_size),
                               rtol=1e-5, atol=1e-5)
