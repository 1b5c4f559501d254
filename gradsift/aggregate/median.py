"""``coordinate_median``: the coordinate-wise median (for even B the mean of the two
middle values, as ``numpy.median``).

Computed by selection (``kthvalue``) over contiguous, cache-sized blocks of coordinates
(:func:`~gradsift.aggregate.base.by_column_blocks`), never along the strided batch axis.
Layer-wise form: per coordinate. No sharded form cheaper than gathering: the
distributed runner gathers every rank's rows, one layer at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, by_column_blocks, empty_guard, reducer, register_aggregator


def median_of(x: Tensor) -> Tensor:
    """Coordinate-wise median ``[B, ...] -> [...]``."""
    empty = empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    if b % 2 == 1:
        return by_column_blocks(x, lambda t: torch.kthvalue(t, b // 2 + 1, dim=1).values)

    def middle_two(t: Tensor) -> Tensor:
        hi = torch.topk(t, b // 2, dim=1, largest=False).values  # the smaller half
        return (hi.max(1).values + torch.kthvalue(t, b // 2 + 1, dim=1).values) / 2

    return by_column_blocks(x, middle_two)


@register_aggregator("coordinate_median", aliases=("median",))
def coordinate_median() -> Aggregator:
    """Coordinate-wise median; see :func:`median_of`."""
    return reducer("coordinate_median", "coordinate_median", per_coordinate=median_of)
