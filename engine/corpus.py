"""Pretraining data: the WikiText corpus tokenized into one stream and cut into next-token rows.

The stream of training rows is a pure function of (seed, position): rows are visited in a seeded permutation,
epoch after epoch, so saving `position` in a checkpoint is all a resume needs. This in-memory corpus is the
default; `data.corpus` streams a corpus of any size from files instead (engine/corpus_stream.py), and
pretraining_source() picks between them.
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
    return encode_lines(tokenizer, lines)


def encode_lines(tokenizer: Tokenizer, lines: list[str]) -> torch.Tensor:
    """The token ids of each line followed by EOS, concatenated."""
    ids: list[int] = []
    for piece in tokenizer.encode_batch(lines):
        ids.extend(piece)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.int64)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len + 1) windows, n = (len - 1) // seq_len (possibly 0), each overlapping the next by one token:
    a window gives tokens [:-1] and next-token labels [1:]."""
    n = max(0, (len(ids) - 1) // seq_len)
    return ids[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len) if n else ids.new_zeros((0, seq_len + 1))


def rows_from_ids(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The windows of a whole corpus split (at least one)."""
    rows = windows(ids, seq_len)
    if not len(rows):
        raise DataError(f"corpus has {len(ids)} tokens, fewer than one row of data.seq_len={seq_len}")
    return rows


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


def pretraining_source(tokenizer: Tokenizer):
    """make_source for train(): the streamed data.corpus (each rank reads its own shards), or the in-memory
    shared corpus, whose global batches each data-parallel rank takes its block of."""
    from engine.corpus_stream import StreamingCorpus
    from engine.data_source import RankSlice

    def make_source(cfg: Config, rank: int, size: int):
        if cfg.data.corpus:
            return StreamingCorpus(cfg, tokenizer, rank, size)
        return RankSlice(CorpusStream(cfg, tokenizer), rank, size)
    return make_source


def unigram_entropy(cfg: Config, tokenizer: Tokenizer) -> float:
    """Cross-entropy (nats/token) of the validation split under the train split's unigram distribution
    (add-one smoothed): the loss a model that ignores context would reach, the bar pretraining must clear."""
    train = Counter(corpus_ids(cfg, tokenizer, "train").tolist())
    valid = corpus_ids(cfg, tokenizer, "valid").tolist()
    total = sum(train.values()) + tokenizer.vocab_size
    return -sum(math.log((train[t] + 1) / total) for t in valid) / len(valid)
