"""``winsorize``: coordinate-wise winsorized mean (Chatterjee, "Coherent Gradients", 2020).

Math: per coordinate, the ``c`` smallest values are raised to the ``(c+1)``-th smallest
and the ``c`` largest lowered to the ``(c+1)``-th largest, then the B values are
averaged. ``c`` is capped at ``(B - 1) // 2`` (the coordinate median).

Computed without sorting where it can be: for ``c <= extremes.MAX_C`` on CPU float32/64,
Numba kernels keep each coordinate's ``c+1`` largest and smallest values
(:mod:`.extremes`); a Linear layer's per-example weight gradients are then formed value
by value inside the kernel (the ``outer`` form), so they never exist. Elsewhere (CUDA,
larger ``c``, no Numba): a pairwise max/min tournament for ``c = 1``, else a sort of each
coordinate's values as one short contiguous row.

Layer-wise form: per coordinate (cache-sized blocks of one layer). Sharded form: each
rank sends its ``c+1`` largest and smallest values per coordinate (all-gather of
``2(c+1)P``), every rank finds the global bounds and all-reduces the sums of the clamped
values (``P``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import extremes
from .base import (Aggregator, Grads, PerCoordinate, Shard, State, by_column_blocks, empty_guard,
                   reducer, register_aggregator, sort_rows_)

#: Largest ``c`` winsorized batch-first by the tournament (its cost grows like c^2); above,
#: each coordinate's values are sorted as a short contiguous row (measured: the tournament
#: wins at c = 1, the rows at c >= 2, by up to 2x at c = 3).
TOURNAMENT_MAX_C = 1
#: Elements per column block of the tournament (1 MB of float32: cache-sized, and small
#: enough that its temporaries do not each cost fresh pages from the OS).
BLOCK_ELEMENTS = 1 << 18


def winsorized_mean(x: Tensor, c: int) -> Tensor:
    """Winsorized mean over the batch axis: ``[B, ...] -> [...]`` (see the module doc).

    Never along the strided batch axis: the result is the mean of the values clamped to
    ``[l, u]``, the ``(c+1)``-th smallest/largest values. These come from the min/max network kernel
    (:func:`.extremes.winsorized_batch`) where it applies; else, for
    ``c <= TOURNAMENT_MAX_C``, from a pairwise tournament of element-wise max/min over
    cache-sized column blocks (:func:`batch_extremes`); larger ``c`` sorts each
    coordinate's values as a short contiguous row (:func:`winsorized_rows`).
    """
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    empty = empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    c = min(c, (b - 1) // 2)
    if c == 0:
        return x.mean(0)
    flat = x.reshape(b, -1)
    fast = extremes.winsorized_batch(flat, c)
    if fast is not None:
        return fast.view(x.shape[1:])
    if c > TOURNAMENT_MAX_C:
        return by_column_blocks(x, lambda t: winsorized_rows(t, c))
    out = flat.new_empty(flat.shape[1])
    block = max(1, BLOCK_ELEMENTS // b)
    for start in range(0, flat.shape[1], block):
        part = flat[:, start : start + block]
        top, bottom = batch_extremes(part, c + 1)
        # the clamped values' sum: never a sum less the extremes, which would cancel an
        # outlier against itself and lose the small values beside it
        out[start : start + block] = torch.clamp(part, bottom[c], top[c]).sum(0) / b
    return out.view(x.shape[1:])


def winsorized_outer_mean(d: Tensor, a: Tensor, c: int) -> Tensor | None:
    """Winsorized mean over examples of the outer products ``d[i]^T a[i]``:
    ``d [B, O], a [B, K] -> [O, K]`` (:func:`.extremes.winsorized_outer`), or None where
    its kernel does not apply."""
    b = d.shape[0]
    c = min(c, (b - 1) // 2)
    if c == 0:
        return (d.T @ a).div_(b) if b else None
    return extremes.winsorized_outer(d, a, c)


def winsorized_rows(t: Tensor, c: int) -> Tensor:
    """Winsorized mean of each row of ``t`` ``[n, B] -> [n]`` (each row one coordinate's
    B values; ``t`` is scratch: its rows are sorted in place)."""
    b = t.shape[1]
    c = min(c, (b - 1) // 2)
    if c == 0:
        return t.mean(1)
    sort_rows_(t)
    return (t[:, c : b - c].sum(1) + c * (t[:, c] + t[:, b - c - 1])) / b


def merge_sorted(a: list[Tensor], b: list[Tensor], k: int, largest: bool) -> list[Tensor]:
    """The k largest (or smallest) of two per-coordinate sorted lists, sorted.

    The j-th largest of the union is ``max_i min(a_i, b_{j-i})`` over the splits with
    ``a_0 = b_0 = +inf`` (the terms with ``a_0``/``b_0`` are just ``b_j``/``a_j``).
    """
    better, worse = (torch.maximum, torch.minimum) if largest else (torch.minimum, torch.maximum)
    out = []
    for j in range(1, min(k, len(a) + len(b)) + 1):
        best: Tensor | None = None
        for i in range(0, j + 1):
            if i > len(a) or j - i > len(b):
                continue
            if i == 0:
                term = b[j - 1]
            elif i == j:
                term = a[j - 1]
            else:
                term = worse(a[i - 1], b[j - i - 1])
            best = term if best is None else better(best, term)
        out.append(best)
    return out


def batch_extremes(x: Tensor, k: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-coordinate k largest (descending) and k smallest (ascending) over axis 0.

    A pairwise tournament: the two halves of the batch are merged element-wise with
    max/min (one op per output element at the first level, ``O(k^2)`` after), so the
    work is a few passes over ``x``, all on contiguous rows.

    Args:
        x: ``[B, N]`` with ``B >= k``.

    Returns:
        (``k`` tensors ``[N]``, largest first; ``k`` tensors ``[N]``, smallest first).
    """
    m = x.shape[0]
    if m < k:
        raise ValueError(f"need at least k={k} rows, got {m}")
    top: list[Tensor] = [x]
    bottom: list[Tensor] = [x]
    leftovers: list[tuple[list[Tensor], list[Tensor]]] = []
    first = True
    while m > 1:
        h = m // 2
        if m % 2:
            leftovers.append(([t[2 * h :] for t in top], [t[2 * h :] for t in bottom]))
        if first:
            hi = torch.maximum(x[:h], x[h : 2 * h])
            lo = torch.minimum(x[:h], x[h : 2 * h])
            top, bottom = [hi, lo][:k], [lo, hi][:k]
            first = False
        else:
            top = merge_sorted([t[:h] for t in top], [t[h : 2 * h] for t in top], k, True)
            bottom = merge_sorted([t[:h] for t in bottom], [t[h : 2 * h] for t in bottom], k, False)
        m = h
    for lt, lb in reversed(leftovers):
        top = merge_sorted(top, lt, k, True)
        bottom = merge_sorted(bottom, lb, k, False)
    return [t[0] for t in top], [t[0] for t in bottom]


def topk_padded(x: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` largest (or smallest) values per coordinate of ``x`` ``[n, ...]`` ->
    ``[k, ...]``, padded with -inf (+inf) when ``n < k``."""
    if x.shape[0] < k:
        fill = float("-inf") if largest else float("inf")
        x = torch.cat([x, x.new_full((k - x.shape[0], *x.shape[1:]), fill)])
    return torch.topk(x, k, dim=0, largest=largest, sorted=True).values


def global_bounds(shard: Shard, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Global k-th smallest and k-th largest per coordinate of the rows of all ranks."""
    top = torch.cat(shard.comm.all_gather(topk_padded(x, k, largest=True)))
    bottom = torch.cat(shard.comm.all_gather(topk_padded(x, k, largest=False)))
    upper = torch.topk(top, k, dim=0, largest=True, sorted=True).values[-1]
    lower = torch.topk(bottom, k, dim=0, largest=False, sorted=True).values[-1]
    return lower, upper


@register_aggregator("winsorize")
def winsorize(c: int = 1) -> Aggregator:
    """Coordinate-wise winsorized mean; see :func:`winsorized_mean`."""
    c = int(c)
    if c < 0:
        raise ValueError(f"winsorize: c must be >= 0, got {c}")
    name = f"winsorize(c={c})"

    def sharded(grads: Grads, state: State, shard: Shard) -> tuple[Grads, State]:
        shard.check_finite(grads, name)
        b = shard.total
        if b == 0:
            return {n: g.new_zeros(g.shape[1:]) for n, g in grads.items()}, state
        cc = min(c, (b - 1) // 2)
        sums = {}
        for n, g in grads.items():
            if cc == 0:
                sums[n] = g.sum(0)
                continue
            lower, upper = global_bounds(shard, g, cc + 1)
            sums[n] = torch.minimum(torch.maximum(g, lower), upper).sum(0)
        return {n: v / b for n, v in shard.all_reduce(sums).items()}, state

    form = PerCoordinate(lambda t: winsorized_rows(t, c), lambda x: winsorized_mean(x, c),
                         lambda d, a: winsorized_outer_mean(d, a, c))
    return reducer(name, "winsorize", per_coordinate=form,
                   sharded=sharded, c=c)
