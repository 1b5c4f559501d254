"""``mean``: the plain mean of per-example gradients (the ordinary SGD direction).

Math: ``u = (1/B) sum_i g_i``, one weighted sum with uniform weights ``1/B``: the gradient
of the mean loss, so a step needs one ordinary backward pass (no per-example gradients,
no hooks), and the sharded form is one all-reduce of ``P`` values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, Grads, WeightedSums, empty_guard, reducer, register_aggregator


def mean_of(x: Tensor) -> Tensor:
    """Mean over the batch axis: ``[B, ...] -> [...]`` (zeros for B = 0)."""
    empty = empty_guard(x)
    return empty if empty is not None else x.mean(0)


def _weights(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((1, b), 1.0 / b if b else 0.0, dtype=dtype, device=device)


def _first(sums: Grads) -> Grads:
    return {n: s[0] for n, s in sums.items()}


#: ``mean`` as one weighted sum (``W = [1/B, ..., 1/B]``): a plain backward pass gives it.
MEAN_FORM = WeightedSums(_weights, _first, uniform=True)


@register_aggregator("mean", aliases=("sgd",))
def mean() -> Aggregator:
    """Plain mean of per-example gradients (ordinary SGD direction)."""
    return reducer("mean", "mean", weighted_sums=MEAN_FORM)
