"""ZeRO-1's slice mapping (engine/parallel/zero.py): every rank's flat slice of a gradient bucket maps back to
exactly the parameter elements (and boxes of them) that the bucket's flat layout puts there."""
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel.data import Bucket
from engine.parallel.zero import copy_params_into_slice, slice_parts, slice_range


@st.composite
def buckets(draw):
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4))
    dp = draw(st.integers(1, 4))
    params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
    total = sum(p.numel() for p in params)
    return Bucket(0, params, offsets, -(-total // dp) * dp, 0, False), dp


@settings(max_examples=60, deadline=None)
@given(buckets())
def test_every_rank_slice_maps_back_to_the_elements_the_flat_layout_puts_there(case):
    bucket, dp = case
    flat = torch.zeros(bucket.numel)
    flat[:sum(p.numel() for p in bucket.params)] = torch.cat([p.detach().reshape(-1) for p in bucket.params])
    covered = {id(p): 0 for p in bucket.params}
    for rank in range(dp):
        lo, hi = slice_range(bucket, rank, dp)
        assert hi - lo == bucket.numel // dp
        mine = flat[lo:hi]
        for part in slice_parts(bucket, lo, hi):
            values = part.param.detach().reshape(-1)[part.param_start:part.param_stop]
            assert torch.equal(mine[part.start:part.stop], values)
            for box, start, stop in part.boxes():  # the same elements as boxes of the parameter, in order
                region = part.param.detach()[tuple(slice(a, b) for a, b in box)].reshape(-1)
                assert torch.equal(mine[start:stop], region)
            covered[id(part.param)] += part.param_stop - part.param_start
        copied = torch.zeros(hi - lo)
        copy_params_into_slice(copied, bucket, lo, hi)
        assert torch.equal(copied, mine)  # the padding stays zero
    assert all(covered[id(p)] == p.numel() for p in bucket.params)  # each element in exactly one slice
