"""``trimmed_mean``: coordinate-wise trimmed mean.

Math: per coordinate, ``k = floor(fraction * B)`` values are dropped at each end and the
rest averaged; ``k`` is capped at ``(B - 1) // 2`` so at least one value remains.

Layer-wise form: per coordinate. Sharded form: global ``(k+1)``-th smallest/largest
bounds from an all-gather of every rank's ``k+1`` extremes (``2(k+1)P``), then one
all-reduce of ``3P`` (sums strictly inside the bounds and tie counts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import extremes
from .base import (Aggregator, Grads, PerCoordinate, Shard, State, by_column_blocks, empty_guard,
                   reducer, register_aggregator, sort_rows_)
from .winsorize import global_bounds


def trimmed_rows(t: Tensor, fraction: float) -> Tensor:
    """Trimmed mean of each row of ``t`` ``[n, B] -> [n]`` (each row one coordinate's B
    values; ``t`` is scratch: its rows are sorted in place, short contiguous rows)."""
    b = t.shape[1]
    k = min(int(math.floor(fraction * b)), (b - 1) // 2)
    if k == 0:
        return t.mean(1)
    sort_rows_(t)
    return t[:, k : b - k].sum(1) / (b - 2 * k)


def trimmed_mean_of(x: Tensor, fraction: float) -> Tensor:
    """Trimmed mean over the batch axis: ``[B, ...] -> [...]`` (see the module doc).

    ``(sum of the middle B - 2k values) / (B - 2k)``: for ``k <= extremes.MAX_C``, by
    the min/max network kernel (:func:`.extremes.trimmed_batch`: the values clamped to
    the ``(k+1)``-th extremes, summed, less ``k`` times both bounds); else over contiguous, cache-sized blocks of
    coordinates, each coordinate's B values sorted as one short contiguous row (never a
    sort along the strided batch axis)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"fraction must be in [0, 0.5), got {fraction}")
    empty = empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    k = min(int(math.floor(fraction * b)), (b - 1) // 2)
    if k == 0:
        return x.mean(0)
    fast = extremes.trimmed_batch(x.reshape(b, -1), k)
    if fast is not None:
        return fast.view(x.shape[1:])
    return by_column_blocks(x, lambda t: trimmed_rows(t, fraction))


def trimmed_outer_mean(d: Tensor, a: Tensor, fraction: float) -> Tensor | None:
    """Trimmed mean over examples of the outer products ``d[i]^T a[i]``:
    ``d [B, O], a [B, K] -> [O, K]`` (:func:`.extremes.trimmed_outer`, for
    ``k <= extremes.MAX_C``), or None where its kernel does not apply."""
    b = d.shape[0]
    k = min(int(math.floor(fraction * b)), (b - 1) // 2)
    if k == 0:
        return (d.T @ a).div_(b) if b else None
    return extremes.trimmed_outer(d, a, k)


@register_aggregator("trimmed_mean")
def trimmed_mean(fraction: float = 0.1) -> Aggregator:
    """Coordinate-wise trimmed mean; see :func:`trimmed_mean_of`."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trimmed_mean: fraction must be in [0, 0.5), got {fraction}")
    name = f"trimmed_mean(fraction={fraction:g})"

    def sharded(grads: Grads, state: State, shard: Shard) -> tuple[Grads, State]:
        shard.check_finite(grads, name)
        b = shard.total
        if b == 0:
            return {n: g.new_zeros(g.shape[1:]) for n, g in grads.items()}, state
        k = min(int(math.floor(fraction * b)), (b - 1) // 2)
        if k == 0:
            return {n: v / b for n, v in shard.all_reduce({n: g.sum(0) for n, g in grads.items()}).items()}, state
        # l, u: the smallest and largest kept values. Kept: everything strictly between,
        # plus (#<=l - k) copies of l and (#>=u - k) copies of u; all of it is l if l == u.
        stats, bounds = {}, {}
        for n, g in grads.items():
            lower, upper = global_bounds(shard, g, k + 1)
            inside = (g > lower) & (g < upper)
            stats[n] = torch.stack([
                torch.where(inside, g, torch.zeros_like(g)).sum(0),
                (g <= lower).sum(0).to(g.dtype),
                (g >= upper).sum(0).to(g.dtype),
            ])
            bounds[n] = (lower, upper)
        out = {}
        for n, s in shard.all_reduce(stats).items():
            lower, upper = bounds[n]
            kept = s[0] + lower * (s[1] - k) + upper * (s[2] - k)
            out[n] = torch.where(lower == upper, lower, kept / (b - 2 * k))
        return out, state

    form = PerCoordinate(lambda t: trimmed_rows(t, fraction), lambda x: trimmed_mean_of(x, fraction),
                         lambda d, a: trimmed_outer_mean(d, a, fraction))
    return reducer(name, "trimmed_mean", per_coordinate=form,
                   sharded=sharded, fraction=fraction)
