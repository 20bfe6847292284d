"""The region arithmetic of engine/parallel/boxes.py: flat element ranges as boxes, splits and intersections."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel.boxes import box_shape, flat_range_boxes, intersect, split_box


@st.composite
def shapes_and_ranges(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    n = math.prod(shape)
    start = draw(st.integers(0, n))
    return shape, start, draw(st.integers(start, n))


@settings(max_examples=60, deadline=None)
@given(shapes_and_ranges())
def test_flat_range_boxes_cover_exactly_the_range_in_order(case):
    shape, start, stop = case
    numbers = torch.arange(math.prod(shape)).view(shape)
    boxes = flat_range_boxes(shape, start, stop)
    assert len(boxes) <= 2 * len(shape) - 1
    values = [numbers[tuple(slice(a, b) for a, b in box)].reshape(-1) for box in boxes]
    flat = torch.cat(values) if values else torch.empty(0, dtype=torch.long)
    assert flat.tolist() == list(range(start, stop))  # row-major order: a flat slice's values fill them in turn


def test_split_and_intersect():
    halves = [split_box((6, 4), 0, r, 2) for r in range(2)]
    assert halves == [((0, 3), (0, 4)), ((3, 6), (0, 4))]
    assert split_box((6, 4), None, 1, 2) == ((0, 6), (0, 4))
    thirds = [split_box((6, 4), 0, r, 3) for r in range(3)]
    assert intersect(halves[0], thirds[1]) == ((2, 3), (0, 4))
    assert intersect(halves[0], thirds[2]) is None
    assert box_shape(((2, 3), (0, 4))) == (1, 4)
