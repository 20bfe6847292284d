"""Tokenizer: trained on the shared corpus, cached by content hash, lossless round trip; both backends
(SentencePiece BPE, `tokenizers` tokenizer.json) give transformers' ids, BOS included where the model adds it."""
import pytest
from hf_folders import built, probe_texts

from engine.config import load_config
from engine.tokenizer import Tokenizer, cached_model_path, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(load_config("configs/tiny.toml"))


def test_round_trip_on_corpus_and_dataset_text(tok, shared_data):
    lines = (shared_data / "corpus" / "valid.txt").read_text().splitlines()[:200]
    for text in [l.strip() for l in lines if l.strip()] + ["Solve 12*p = -9*p + 21 for p.", "naïve café — 東京"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 4096 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3


def test_cache_is_reused_and_keyed_by_settings(tok):
    cfg = load_config("configs/tiny.toml")
    assert train_tokenizer(cfg) == tok.path
    other = load_config("configs/tiny.toml", ["--model.vocab_size=2048"])
    assert cached_model_path(other) != tok.path


def test_named_model_file_is_used_and_checked(tok, tmp_path):
    cfg = load_config("configs/tiny.toml", [f"--data.tokenizer={tok.path}"])
    assert load_tokenizer(cfg).path == tok.path
    bad = load_config("configs/tiny.toml", [f"--data.tokenizer={tok.path}", "--model.vocab_size=1000"])
    with pytest.raises(ValueError, match="tokenizer has 4096 pieces but model.vocab_size=1000"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.model")


@pytest.mark.parametrize("kind, file, backend", [("llama2", "tokenizer.model", "sentencepiece-bpe"),
                                                  ("llama2", "tokenizer.json", "tokenizers"),
                                                  ("llama3", "tokenizer.json", "tokenizers")])
def test_both_backends_give_transformers_ids(kind, file, backend, tmp_path_factory, shared_data):
    transformers = pytest.importorskip("transformers")
    folder = built(kind, tmp_path_factory, shared_data / "corpus")
    ours, theirs = Tokenizer.load(folder / file), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.kind == backend and ours.vocab_size == len(theirs) and ours.add_bos
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in probe_texts(shared_data):
        if file == "tokenizer.model" and text.startswith(" "):
            continue  # where transformers 5 and SentencePiece differ (test_hf_tokenizer_check)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.bos_prefix + ours.encode(text) == theirs.encode(text), text
    assert ours.decode(ours.encode("Hello world, 12 apples.")) == "Hello world, 12 apples."


def test_trained_tokenizer_adds_no_bos(tok):
    assert tok.kind == "sentencepiece-unigram" and tok.bos_prefix == []
