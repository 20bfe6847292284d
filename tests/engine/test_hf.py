"""export-hf: transformers' LlamaForCausalLM on an exported folder gives our logits, its tokenizer our ids, for
every tokenizer kind (SentencePiece unigram and BPE, tokenizer.json); import -> export round-trips the
original folder's logits and ids exactly; a non-empty output folder is refused unless --force."""
import json

import pytest
import torch

from engine.batch import Batch
from engine.checkpoint import load_meta, load_model_state, save_weights
from engine.config import Config, ModelConfig, load_config
from engine.hf import HFError, check_tokenizer, export_hf, import_hf
from engine.model import build_model

transformers = pytest.importorskip("transformers", reason="transformers is a test extra (requirements-test.txt)")


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(load_config("configs/tiny.toml"))


def saved_model(tmp_path, tokenizer, **model_fields):
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=16, d_ff=48, **model_fields))
    cfg.data.tokenizer = str(tokenizer.path)
    model = build_model(cfg.model, seed=7).eval()
    with torch.no_grad():  # norm gains away from 1 so that a swapped norm would show
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    step = save_weights(tmp_path / "run", 1, model.state_dict(), {"config": cfg.to_dict()}, keep=1)
    return model, step


@pytest.mark.parametrize("fields", [dict(), dict(mlp="geglu", tie_embeddings=False, rope_theta=500.0, norm_eps=1e-5)],
                         ids=["swiglu-tied", "geglu-untied"])
def test_transformers_logits_equal_ours(tmp_path, tokenizer, fields):
    model, step = saved_model(tmp_path, tokenizer, **fields)
    out = export_hf(step, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(Batch(tokens)), hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_exported_tokenizer_encodes_our_ids(tmp_path, tokenizer, shared_data):
    _, step = saved_model(tmp_path, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(step, tmp_path / "hf"))
    texts = ["  leading and trailing  ", "tabs\tand\nnew\n\nlines", "naïve café — 東京 ½ ﬁ", "OPTIONS:\n- yes\n- no"]
    for folder in ("rte", "dart", "wmt16_translate_fien"):
        with (shared_data / folder / "validation.jsonl").open() as f:
            for _, line in zip(range(30), f):
                texts += [v for v in json.loads(line).values() if isinstance(v, str)]
    assert check_tokenizer(hf_tok, tokenizer, texts) == []
    assert hf_tok.decode(tokenizer.encode("Hello world, 12 apples.")) == "Hello world, 12 apples."


def test_import_brings_the_exported_weights_back(tmp_path, tokenizer):
    model, step = saved_model(tmp_path, tokenizer, tie_embeddings=False)
    back = import_hf(export_hf(step, tmp_path / "hf"), tmp_path / "imported")
    state, original = load_model_state(back), load_model_state(step)
    assert set(state) == set(original)
    for name in state:
        torch.testing.assert_close(state[name], original[name], rtol=0, atol=0)
    cfg = load_meta(back)["config"]
    assert cfg["model"]["tie_embeddings"] is False and cfg["data"]["tokenizer"].endswith("tokenizer.model")
    preset = load_config(tmp_path / "imported" / "config.toml")  # what `flan tune` is pointed at
    assert preset.to_dict() == cfg


def test_import_names_a_missing_tensor_and_tokenizer(tmp_path, tokenizer):
    _, step = saved_model(tmp_path, tokenizer)
    out = export_hf(step, tmp_path / "hf")
    (out / "tokenizer.model").unlink()
    (out / "tokenizer.json").rename(out / "kept.json")
    with pytest.raises(HFError, match="neither tokenizer.model nor tokenizer.json"):
        import_hf(out, tmp_path / "a")
    (out / "kept.json").rename(out / "tokenizer.json")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(HFError, match="model.layers.1.mlp.up_proj.weight' is missing"):
        import_hf(out, tmp_path / "b")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_data):
    from hf_folders import built

    return {k: built(k, tmp_path_factory, shared_data / "corpus") for k in ("llama2", "llama3")}


def hf_logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("kind, trust", [("llama2", "json"), ("llama3", "auto")])
def test_import_then_export_round_trips_logits_and_ids(kind, trust, folders, tmp_path, shared_data):
    from engine.hf.tokenizer_check import probe_texts

    step = import_hf(folders[kind], tmp_path / "run", trust=trust)
    out = export_hf(step, tmp_path / "hf")
    torch.testing.assert_close(hf_logits(out), hf_logits(folders[kind]), rtol=0, atol=0)
    original, exported = (transformers.AutoTokenizer.from_pretrained(f) for f in (folders[kind], out))
    for text in probe_texts():
        assert exported.encode(text) == original.encode(text), text
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (kind == "llama3")


def test_sentencepiece_bpe_exports_and_comes_back(folders, tmp_path):
    from engine.hf.tokenizer_check import probe_texts
    from engine.tokenizer import Tokenizer

    step = import_hf(folders["llama2"], tmp_path / "run", trust="model")  # SentencePiece BPE, byte fallback
    tok = Tokenizer.load(load_meta(step)["config"]["data"]["tokenizer"])
    out = export_hf(step, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.kind == "sentencepiece-bpe" and check_tokenizer(hf_tok, tok, probe_texts()) == []
    assert hf_tok.decode(tok.encode("Hello world, 12 apples.")) == "Hello world, 12 apples."
    torch.testing.assert_close(hf_logits(out), hf_logits(folders["llama2"]), rtol=0, atol=0)
    back = import_hf(out, tmp_path / "back")  # the two files of the export agree, so no --trust-tokenizer
    for name, t in load_model_state(back).items():
        assert torch.equal(t, load_model_state(step)[name])


def test_export_into_a_non_empty_folder_needs_force(tmp_path, tokenizer):
    _, step = saved_model(tmp_path, tokenizer)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "config.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(HFError, match="already exists and is not empty.*--force"):
        export_hf(step, out)
    assert (out / "config.json").read_text() == "{}"  # untouched
    export_hf(step, out, force=True)
    assert not (out / "model-00001-of-00002.safetensors").exists() and (out / "README.md").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
