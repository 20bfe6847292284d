"""The Batch contract: what packing yields and the model eats (see docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A packed batch.

    tokens      (B, S) int64  token ids
    labels      (B, S) int64  next-token targets aligned with `tokens` (label[t] is the token that
                              should follow tokens[t]); IGNORE_INDEX where no loss (prompts, padding)
    segment_ids (B, S) int32  1..n for the packed examples of a row, 0 for padding
    positions   (B, S) int32  position inside the segment, restarting at 0 in every segment
    packed      False when built without segment ids (one example per row, no padding): attention then
                needs no segment mask, which the Triton kernel skips (engine/model.py)
    """

    tokens: torch.Tensor
    labels: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    packed: bool = True

    def __post_init__(self):
        B, S = self.tokens.shape
        if self.segment_ids is None:
            self.packed = False
            self.segment_ids = torch.ones(B, S, dtype=torch.int32, device=self.tokens.device)
        if self.positions is None:
            self.positions = positions_from_segments(self.segment_ids)
        for f in ("labels", "segment_ids", "positions"):
            t = getattr(self, f)
            if t is not None and t.shape != (B, S):
                raise ValueError(f"Batch.{f} has shape {tuple(t.shape)}, expected {(B, S)} like tokens")

    def _map(self, fn) -> "Batch":
        """The same batch with `fn` applied to every tensor field."""
        return Batch(**{f.name: (fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                        for f in fields(self)})

    def to(self, device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def slice_rows(self, start: int, end: int) -> "Batch":
        """Rows [start, end): how gradient accumulation and data parallelism split a global batch."""
        return self._map(lambda t: t[start:end])

    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum()) if self.labels is not None else 0


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along the sequence."""
    B, S = segment_ids.shape
    idx = torch.arange(S, device=segment_ids.device).expand(B, S)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return (idx - start_idx).to(torch.int32)
