"""``coordinate_median``: the coordinate-wise median (for even B the mean of the two
middle values, as ``numpy.median``).

Computed over contiguous, cache-sized blocks of coordinates, each coordinate's values
sorted as one short contiguous row
(:func:`~gradsift.aggregate.base.by_column_blocks`), never along the strided batch axis.
Layer-wise form: per coordinate. No sharded form cheaper than gathering: the
distributed runner gathers every rank's rows, one layer at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, PerCoordinate, by_column_blocks, empty_guard, reducer, register_aggregator, sort_rows_


def median_rows(t: Tensor) -> Tensor:
    """Median of each row of ``t`` ``[n, B] -> [n]`` (``t`` is scratch: rows sorted in place)."""
    b = t.shape[1]
    sort_rows_(t)
    if b % 2 == 1:
        return t[:, b // 2].clone()
    return (t[:, b // 2 - 1] + t[:, b // 2]) / 2


def median_of(x: Tensor) -> Tensor:
    """Coordinate-wise median ``[B, ...] -> [...]``."""
    empty = empty_guard(x)
    if empty is not None:
        return empty
    return by_column_blocks(x, median_rows)


@register_aggregator("coordinate_median", aliases=("median",))
def coordinate_median() -> Aggregator:
    """Coordinate-wise median; see :func:`median_of`."""
    return reducer("coordinate_median", "coordinate_median", per_coordinate=PerCoordinate(median_rows, median_of))
