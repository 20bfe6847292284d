"""Pretraining data: the WikiText corpus tokenized into one stream and cut into next-token rows.

The stream of training rows is a pure function of (seed, position): rows are visited in a seeded permutation,
epoch after epoch, so saving `position` in a checkpoint is all a resume needs.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from engine.batch import Batch
from engine.config import Config
from engine.data_files import DataError, report_skipped, text_lines
from engine.paths import shared_data_dir
from engine.tokenizer import Tokenizer


def corpus_ids(cfg: Config, tokenizer: Tokenizer, split: str) -> torch.Tensor:
    """Token ids of corpus/<split>.txt, lines joined with EOS at the end of each article paragraph."""
    path = shared_data_dir(cfg.data.data_dir or None) / "corpus" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: corpus split {split!r} is missing from the data folder; restore it or point "
                        "--data.data_dir at a folder holding corpus/train.txt and corpus/valid.txt")
    skipped: list[str] = []
    lines = list(text_lines(path, cfg.data.bad_rows, skipped))
    report_skipped(f"corpus {split}", skipped)
    if not lines:
        raise DataError(f"{path}: corpus split {split!r} holds no text; restore the file")
    ids: list[int] = []
    for piece in tokenizer.encode_batch(lines):
        ids.extend(piece)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def rows_from_ids(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len + 1) non-overlapping windows; each gives tokens [:-1] and next-token labels [1:]."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise DataError(f"corpus has {len(ids)} tokens, fewer than one row of data.seq_len={seq_len}")
    return torch.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def rows_to_batch(rows: torch.Tensor) -> Batch:
    return Batch(tokens=rows[:, :-1].contiguous(), labels=rows[:, 1:].contiguous())


class CorpusStream:
    """Global batches of `batch_size` rows in a seeded order; state is the number of rows consumed."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer):
        self.rows = rows_from_ids(corpus_ids(cfg, tokenizer, "train"), cfg.data.seq_len)
        self.val_rows = rows_from_ids(corpus_ids(cfg, tokenizer, "valid"), cfg.data.seq_len)
        self.batch_size = cfg.train.batch_size
        self.seed = cfg.train.seed
        self.position = 0
        self._epoch, self._order = -1, None

    def _row_index(self, i: int) -> int:
        epoch, offset = divmod(i, len(self.rows))
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.rows), generator=gen)
        return int(self._order[offset])

    def next_batch(self) -> Batch:
        idx = [self._row_index(self.position + j) for j in range(self.batch_size)]
        self.position += self.batch_size
        return rows_to_batch(self.rows[idx])

    def val_batches(self, n: int) -> list[Batch]:
        """The first n batches of the validation split (the same every time)."""
        out = []
        for b in range(n):
            chunk = self.val_rows[b * self.batch_size:(b + 1) * self.batch_size]
            if len(chunk) == 0:
                break
            out.append(rows_to_batch(chunk))
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def unigram_entropy(cfg: Config, tokenizer: Tokenizer) -> float:
    """Cross-entropy (nats/token) of the validation split under the train split's unigram distribution
    (add-one smoothed): the loss a model that ignores context would reach, the bar pretraining must clear."""
    train = Counter(corpus_ids(cfg, tokenizer, "train").tolist())
    valid = corpus_ids(cfg, tokenizer, "valid").tolist()
    total = sum(train.values()) + tokenizer.vocab_size
    return -sum(math.log((train[t] + 1) / total) for t in valid) / len(valid)
