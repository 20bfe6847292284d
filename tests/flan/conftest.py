"""Fixtures for the FLAN data tests: a tiny deterministic tokenizer with the engine Tokenizer's interface."""
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
