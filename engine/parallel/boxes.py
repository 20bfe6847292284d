"""Regions of global tensors as boxes: one (start, stop) pair per dimension.

    box = split_box((6, 4), dim=0, rank=1, world=2)      # ((3, 6), (0, 4)): rank 1's half of the rows
    intersect(box, other)                                # the overlap, or None
    flat_range_boxes((6, 4), 5, 13)                      # row-major elements [5, 13) as boxes, in order

Checkpoints describe what every file holds with boxes, the shard specs describe what every rank holds, and
ZeRO-1's flat slices of gradient buckets become boxes of the parameters they cover (engine/parallel/zero.py).
"""
from __future__ import annotations

import math

Box = tuple[tuple[int, int], ...]


def split_box(global_shape: tuple[int, ...], dim: int | None, rank: int, world: int) -> Box:
    """Rank `rank`'s region of an equal contiguous split along `dim` (the whole tensor when dim is None)."""
    box = [(0, n) for n in global_shape]
    if dim is not None and world > 1:
        size = global_shape[dim] // world
        box[dim] = (rank * size, (rank + 1) * size)
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def offset_box(box: Box, origin: Box) -> Box:
    """A box in a local tensor's coordinates moved into the global tensor's (the local tensor is `origin`)."""
    return tuple((a + o, b + o) for (a, b), (o, _) in zip(box, origin))


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The row-major elements [start, stop) of a tensor of `shape`, as at most 2 ndim - 1 boxes, in order (the
    range's values fill them one after another)."""
    if start >= stop:
        return []
    if not shape:
        return [()]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, first + 1),) + box for box in flat_range_boxes(shape[1:], start - first * inner,
                                                                            stop - first * inner)]
    out = []
    if start % inner:  # a partial leading row
        out += [((first, first + 1),) + box for box in flat_range_boxes(shape[1:], start % inner, inner)]
        first += 1
    whole_end = last if stop % inner else last + 1
    if first < whole_end:
        out.append(((first, whole_end),) + tuple((0, n) for n in shape[1:]))
    if stop % inner:  # a partial trailing row
        out += [((last, last + 1),) + box for box in flat_range_boxes(shape[1:], 0, stop % inner)]
    return out
