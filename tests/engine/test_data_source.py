"""The data-source adapter: RankSlice turns a stream of global batches into one data-parallel rank's rows, and
the ranks' rows in rank order are the global batch; the stream's state passes through untouched."""
import pytest
import torch

from engine.batch import Batch
from engine.data_source import RankSlice


class Counting:
    """A global-batch stream: batch k holds rows k*rows .. (k+1)*rows - 1 (each row is its index)."""

    def __init__(self, rows: int):
        self.rows, self.position = rows, 0

    def next_batch(self) -> Batch:
        start = self.position * self.rows
        self.position += 1
        return Batch(torch.arange(start, start + self.rows)[:, None].repeat(1, 3))

    def val_batches(self, n: int) -> list[Batch]:
        return [Batch(-torch.arange(self.rows)[:, None].repeat(1, 3)) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@pytest.mark.parametrize("dp", [1, 2, 3, 6])
def test_the_ranks_rows_in_rank_order_are_the_global_batch(dp):
    ranks = [RankSlice(Counting(6), r, dp) for r in range(dp)]
    reference = Counting(6)
    for _ in range(3):
        want = reference.next_batch().tokens
        got = [s.next_batch().tokens for s in ranks]
        assert all(g.shape[0] == 6 // dp for g in got)
        assert torch.equal(torch.cat(got), want)
    val = [s.val_batches(2) for s in ranks]
    assert torch.equal(torch.cat([v[1].tokens for v in val]), reference.val_batches(2)[1].tokens)
    assert all(s.state_dict() == {"position": 3} for s in ranks)
    ranks[0].load_state_dict({"position": 7})
    assert int(ranks[0].next_batch().tokens[0, 0]) == 7 * 6


def test_a_batch_that_dp_does_not_divide_names_the_fix():
    with pytest.raises(ValueError, match="6 rows does not divide by parallel.dp=4; pick a batch size that dp divides"):
        RankSlice(Counting(6), 0, 4).next_batch()
