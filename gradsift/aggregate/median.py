"""``coordinate_median``: the coordinate-wise median (for even B the mean of the two
middle values, as ``numpy.median``).

Layer-wise form: per coordinate. No sharded form cheaper than gathering: the
distributed runner gathers every rank's rows, one layer at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, empty_guard, reducer, register_aggregator


def median_of(x: Tensor) -> Tensor:
    """Coordinate-wise median ``[B, ...] -> [...]``."""
    empty = empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    if b % 2 == 1:
        return torch.kthvalue(x, b // 2 + 1, dim=0).values
    lo = torch.kthvalue(x, b // 2, dim=0).values
    hi = torch.kthvalue(x, b // 2 + 1, dim=0).values
    return (lo + hi) / 2


@register_aggregator("coordinate_median", aliases=("median",))
def coordinate_median() -> Aggregator:
    """Coordinate-wise median; see :func:`median_of`."""
    return reducer("coordinate_median", "coordinate_median", per_coordinate=median_of)
