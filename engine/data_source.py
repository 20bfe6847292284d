"""The data-source contract between the training loop and the data streams, and the adapter for streams that
compute whole global batches.

    source = make_source(cfg, dp_rank, dp_size)     # what train() calls: this data-parallel rank's stream
    rows = source.next_batch()                      # this rank's rows of the next global batch
    rows = source.val_batches(n)                    # this rank's rows of the first n validation batches
    source.state_dict() / source.load_state_dict(state)

    make_source = lambda cfg, rank, size: RankSlice(TuningStream(cfg, tokenizer), rank, size)

Ranks of one data-parallel replica (its tensor and pipeline peers) get the same rows. The loop sums the
target-token count over the replicas (one scalar all-reduce) for the loss normalisation, so a source that
reads only its rank's rows is exact. `RankSlice` serves a stream that builds the global batch (the FLAN
mixture, the in-memory corpus): rank r of dp takes the r-th of dp contiguous row blocks, so the concatenation
over ranks in rank order is the single-device global batch and a dp run equals one device. A source that
reads only its own rank's share (the streamed corpus, engine/corpus_stream.py: disjoint shards per rank)
needs no RankSlice; its global batch is then not the single-device one, but each epoch's rows are.
"""
from __future__ import annotations

from typing import Protocol

from engine.batch import Batch


class BatchSource(Protocol):
    """What the loop needs from a data stream (the corpus for pretraining, the FLAN mixture for tuning)."""

    def next_batch(self) -> Batch: ...
    def val_batches(self, n: int) -> list[Batch]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def rank_rows(batch: Batch, rank: int, size: int) -> Batch:
    """Rank `rank`'s contiguous block of a global batch split `size` ways."""
    if size == 1:
        return batch
    rows = batch.tokens.shape[0]
    if rows % size:
        raise ValueError(f"train.batch_size (or grad-accumulation micro-batch) of {rows} rows does not divide "
                         f"by parallel.dp={size}; pick a batch size that dp divides")
    share = rows // size
    return batch.slice_rows(rank * share, (rank + 1) * share)


class RankSlice:
    """A BatchSource of one data-parallel rank's rows, over a source that yields global batches. Every rank
    runs the whole global stream (its state is the global position, the same on every rank)."""

    def __init__(self, source: BatchSource, rank: int, size: int):
        self.source, self.rank, self.size = source, rank, size

    def next_batch(self) -> Batch:
        return rank_rows(self.source.next_batch(), self.rank, self.size)

    def val_batches(self, n: int) -> list[Batch]:
        return [rank_rows(b, self.rank, self.size) for b in self.source.val_batches(n)]

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)
