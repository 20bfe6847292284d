"""Tokenizer: trained on the shared corpus, cached by content hash, lossless round trip."""
import pytest

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
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        Tokenizer.load(tmp_path / "missing.model")
