"""Hugging Face interop: transformers' LlamaForCausalLM on an exported folder gives our logits, its tokenizer
our ids; import-hf brings the same weights back; unsupported inputs are refused by name."""
import json

import pytest
import torch

from engine.batch import Batch
from engine.checkpoint import load_meta, load_model_state, save_weights
from engine.config import Config, ModelConfig, load_config
from engine.hf import HFError, check_tokenizer, export_hf, import_hf, model_config_from_llama
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


def test_unsupported_llama_variants_are_refused(tmp_path):
    base = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    assert model_config_from_llama(base, tmp_path).head_dim == 8
    with pytest.raises(HFError, match="rope scaling 'llama3'"):
        model_config_from_llama(dict(base, rope_scaling={"rope_type": "llama3"}), tmp_path)
    with pytest.raises(HFError, match="attention_bias=true"):
        model_config_from_llama(dict(base, attention_bias=True), tmp_path)
    with pytest.raises(HFError, match="hidden_act='relu'"):
        model_config_from_llama(dict(base, hidden_act="relu"), tmp_path)
    with pytest.raises(HFError, match="model_type is 'gpt2'"):
        model_config_from_llama(dict(base, model_type="gpt2"), tmp_path)


def test_import_names_a_missing_tensor_and_tokenizer(tmp_path, tokenizer):
    _, step = saved_model(tmp_path, tokenizer)
    out = export_hf(step, tmp_path / "hf")
    (out / "tokenizer.model").unlink()
    with pytest.raises(HFError, match="no tokenizer.model"):
        import_hf(out, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(out / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(HFError, match="model.layers.1.mlp.up_proj.weight' is missing"):
        import_hf(out, tmp_path / "b")
