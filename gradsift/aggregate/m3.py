"""``m3``: median of the means of 3 groups, per coordinate (Zielinski et al., "Weak and
Strong Gradient Directions").

Math: the batch is split in order into 3 contiguous groups with sizes as equal as
possible (``numpy.array_split``: the first ``B % 3`` groups get one more); the update is
the element-wise median of the 3 group means. With ``B < 3`` it is the mean.

The 3 group means are 3 weighted sums (group indicator weights / group size), so the
layer-wise form never forms per-example gradients and the sharded form is one all-reduce
of ``3P`` values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (Aggregator, Grads, WeightedSums, empty_guard, group_weights, median3,
                   reducer, register_aggregator, weighted_update)


def _weights(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if b < 3:  # the mean, as three equal rows
        return torch.full((3, b), 1.0 / b if b else 0.0, dtype=dtype, device=device)
    return group_weights(b, 3, dtype, device)


def _combine(sums: Grads) -> Grads:
    return {n: median3(s[0], s[1], s[2]) for n, s in sums.items()}


#: ``m3`` as 3 weighted sums and an element-wise median.
M3_FORM = WeightedSums(_weights, _combine)


def m3_mean(x: Tensor) -> Tensor:
    """Median of the means of 3 groups, per coordinate: ``[B, ...] -> [...]``."""
    empty = empty_guard(x)
    if empty is not None:
        return empty
    return weighted_update(M3_FORM, {"x": x})["x"]


@register_aggregator("m3")
def m3() -> Aggregator:
    """Coordinate-wise median of the means of 3 contiguous groups; see :func:`m3_mean`."""
    return reducer("m3", "m3", weighted_sums=M3_FORM)
