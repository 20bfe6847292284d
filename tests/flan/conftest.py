"""Fixtures for the FLAN tests: a tiny deterministic tokenizer with the engine Tokenizer's interface, and the
small fp32 CPU model config the scorer's layout tests build under each layout."""
import zlib

import pytest


class WordTokenizer:
    """Whitespace words hashed (crc32, stable across processes) into ids 4..vocab_size-1.

    Same duck-typed interface as engine.tokenizer.Tokenizer; ids 0-3 are pad, unk, bos, eos.
    """

    pad_id, bos_id, eos_id = 0, 2, 3
    vocab_size = 1000
    add_bos = False

    def encode(self, text: str) -> list[int]:
        return [4 + zlib.crc32(w.encode()) % (self.vocab_size - 4) for w in text.split()]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return " ".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="session")
def word_tokenizer():
    return WordTokenizer()


def small_layout_config(parallel: dict, *, vocab_size: int, n_layers: int, init_std: float):
    """A 16-wide fp32 CPU model config (4 heads of 4, 2 KV heads) under the `parallel` section's fields."""
    from engine.config import Config, ModelConfig, ParallelConfig, resolve_auto

    cfg = Config(model=ModelConfig(vocab_size=vocab_size, d_model=16, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                   head_dim=4, d_ff=32, init_std=init_std), parallel=ParallelConfig(**parallel))
    cfg.train.device = "cpu"
    return resolve_auto(cfg.validate("test"), cuda_available=False)
