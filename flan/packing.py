"""Pack (input, target) token pairs into fixed-length rows and the Batch contract.

    inp, tgt = encode_pair(tokenizer, prompt, target, input_len=1024, target_len=256)
    rows = list(pack_rows(examples, row_len=1280))       # or TuningStream in flan/mixture.py
    batch = rows_to_batch(rows[:16], row_len=1280, pad_id=tokenizer.pad_id)

Truncation rule (FLAN's budgets: input 1024, target 256 tokens). The input keeps its LAST `input_len`
tokens: our templates put the question and the OPTIONS block after the passage, so a cut falls in the
passage, not in what the model must answer. The target keeps its FIRST `target_len - 1` tokens and then
EOS, so every target ends with EOS and the answer's beginning (what the scorer ranks) survives.
An input that encodes to nothing becomes a single BOS, so the first target token has a predecessor.

Segment layout. For input ids I and target ids T (T ends with EOS) a segment occupies len(I)+len(T)-1
positions:
    tokens = I + T[:-1]
    labels = [-100] * (len(I) - 1) + T
so labels[t] is the token that follows tokens[t] (engine.batch.Batch's shifted convention): the last
input token predicts T[0], each target token predicts the next, and the segment's last position predicts
EOS. Every target token, EOS included, is a label exactly once; input tokens never are; no label points
into another segment, because a segment's labels end inside itself. Padding has token pad_id, label -100,
segment id 0 and position 0; positions restart at 0 in every segment.

Packing: each row starts with the oldest waiting example (so none waits forever), then repeatedly takes
the longest waiting example that still fits (best fit, oldest first among equal lengths). With a pool of
a few dozen waiting examples this fills rows almost completely; `efficiency` = non-padding / all tokens.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from engine.batch import IGNORE_INDEX, Batch

DEFAULT_POOL = 64  # waiting examples the packer chooses from; more fills rows better but delays examples


@dataclass(frozen=True)
class Segment:
    """One example ready to pack: its tokens and shifted labels (see the module docstring)."""
    tokens: list[int]
    labels: list[int]
    length: int


def input_window(ids: Sequence[int], input_len: int, bos_id: int, add_bos: bool = False) -> list[int]:
    """The input rule: the last input_len ids (BOS first where the model's tokenizer adds BOS), or one BOS for
    an empty input."""
    if add_bos:
        return [bos_id] + (list(ids[-(input_len - 1):]) if input_len > 1 and ids else [])
    return list(ids[-input_len:]) if ids else [bos_id]


def truncate_pair(input_ids: Sequence[int], target_ids: Sequence[int], input_len: int, target_len: int,
                  eos_id: int, bos_id: int, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Apply the truncation rule: keep the input's end and the target's start, then append EOS."""
    if input_len < 1 or target_len < 1:
        raise ValueError(f"input_len={input_len} and target_len={target_len} must both be at least 1")
    inp = input_window(input_ids, input_len, bos_id, add_bos)
    return inp, list(target_ids[: target_len - 1]) + [eos_id]


def make_segment(input_ids: Sequence[int], target_ids: Sequence[int]) -> Segment:
    """Tokens and labels of one example; target_ids must already end with EOS."""
    if not input_ids or not target_ids:
        raise ValueError("a segment needs at least one input token and one target token (EOS)")
    tokens = list(input_ids) + list(target_ids[:-1])
    labels = [IGNORE_INDEX] * (len(input_ids) - 1) + list(target_ids)
    return Segment(tokens, labels, len(tokens))


def encode_pair(tokenizer, prompt: str, target: str, *, input_len: int, target_len: int) -> Segment:
    """Tokenize, truncate and lay out one rendered example."""
    inp, tgt = truncate_pair(tokenizer.encode(prompt), tokenizer.encode(target), input_len, target_len,
                             tokenizer.eos_id, tokenizer.bos_id, tokenizer.add_bos)
    return make_segment(inp, tgt)


def encode_pairs(tokenizer, prompts: list[str], targets: list[str], *, input_len: int,
                 target_len: int) -> list[Segment]:
    """encode_pair over many examples.

    One encode() per text on purpose: SentencePiece's list call starts worker threads on every call,
    which costs more than it saves on the few dozen texts the packer asks for at a time.
    """
    eos, bos, encode = tokenizer.eos_id, tokenizer.bos_id, tokenizer.encode
    return [make_segment(*truncate_pair(encode(p), encode(t), input_len, target_len, eos, bos, tokenizer.add_bos))
            for p, t in zip(prompts, targets)]


def choose_segments(lengths: Sequence[int], row_len: int) -> list[int]:
    """Indices into `lengths` (oldest first) of the examples that fill one row, in placement order."""
    if not lengths:
        return []
    if lengths[0] > row_len:
        raise ValueError(f"a segment of {lengths[0]} tokens cannot fit a row of {row_len}")
    chosen, space = [0], row_len - lengths[0]
    # Sorted (length, -index): the entry just left of (space, +inf) is the longest fit, oldest on ties.
    waiting = sorted((n, -j) for j, n in enumerate(lengths) if j > 0)
    while waiting and waiting[0][0] <= space:
        k = bisect.bisect_right(waiting, (space, 1)) - 1
        n, neg_j = waiting.pop(k)
        chosen.append(-neg_j)
        space -= n
    return chosen


def pack_rows(segments: Iterable[Segment], row_len: int, pool: int = DEFAULT_POOL) -> Iterator[list[Segment]]:
    """Pack a stream of segments into rows (lists of segments) of at most `row_len` tokens."""
    waiting: list[Segment] = []
    source = iter(segments)
    exhausted = False
    while True:
        while not exhausted and len(waiting) < pool:
            nxt = next(source, None)
            if nxt is None:
                exhausted = True
            else:
                waiting.append(nxt)
        if not waiting:
            return
        picked = choose_segments([s.length for s in waiting], row_len)
        yield [waiting[j] for j in picked]
        taken = set(picked)
        waiting = [s for j, s in enumerate(waiting) if j not in taken]


def rows_to_batch(rows: Sequence[Sequence[Segment]], row_len: int, pad_id: int) -> Batch:
    """Lay packed rows out as a Batch of shape (len(rows), row_len)."""
    B = len(rows)
    tokens = np.full((B, row_len), pad_id, dtype=np.int64)
    labels = np.full((B, row_len), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((B, row_len), dtype=np.int32)
    positions = np.zeros((B, row_len), dtype=np.int32)
    for b, row in enumerate(rows):
        start = 0
        for sid, seg in enumerate(row, 1):
            end = start + seg.length
            if end > row_len:
                raise ValueError(f"row {b} holds {end} tokens, more than row_len={row_len}")
            tokens[b, start:end] = seg.tokens
            labels[b, start:end] = seg.labels
            segment_ids[b, start:end] = sid
            positions[b, start:end] = np.arange(seg.length, dtype=np.int32)
            start = end
    return Batch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(segment_ids),
                 torch.from_numpy(positions))


def efficiency(rows: Iterable[Sequence[Segment]], row_len: int) -> float:
    """Fraction of row positions holding tokens rather than padding."""
    used = total = 0
    for row in rows:
        used += sum(s.length for s in row)
        total += row_len
    return used / total if total else 0.0
