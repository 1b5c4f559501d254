"""Aggregators across ranks: each rank holds the per-example gradients of its shard of the
global batch; :class:`GlobalAggregation` turns them into the update a single process
would compute from the whole global batch.

The global batch order is the shards concatenated in rank order (each rank takes a
contiguous slice, see :func:`~gradsift.distributed.comm.shard_bounds`), so aggregators
that depend on the order (M3's contiguous groups) are well defined.

Mode ``"exact"`` (default): the result equals the single-process result on the same global
batch, up to floating-point summation order. What each rank sends per step, with ``P``
parameters, ``B`` the global batch, ``W`` ranks (all layer by layer, so at most one
layer's gathered values exist at once):

================================  ====================================================
``mean`` (and ``clip > mean``)    one all-reduce of ``P`` values
``m3``                            one all-reduce of ``3P`` values (each rank's partial
                                  sums of the 3 contiguous groups)
``winsorize(c)``                  all-gather of its ``c+1`` largest and smallest values
                                  per coordinate (``2(c+1)P``), then an all-reduce of
                                  ``P`` (sums of the clamped values)
``trimmed_mean(f)``               all-gather of ``2(k+1)P``, ``k = floor(f B)``, then an
                                  all-reduce of ``3P`` (sums and tie counts)
``coordinate_median`` and any     all-gather of every per-example gradient, ``B P``
other per-coordinate reducer      (each rank receives the whole ``B x P``, one layer at
                                  a time)
any other aggregator              all-gather of all per-example gradients, then the
                                  aggregator runs unchanged on every rank
================================  ====================================================

Example-wise stages (``clip``, ``drop_nonfinite``) run on each shard with no
communication; batch stages after the reduction (e.g. ``rm3``, noise) run on every rank
on identical inputs, so random ones must draw from generators seeded alike on all ranks.

Mode ``"local"`` (clearly not exact): each rank aggregates its own shard and the results
are averaged weighted by shard size: one all-reduce of ``P``. A robust aggregator then
only sees ``B / W`` examples at a time.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from .. import aggregate as A
from ..aggregate import Aggregator, Grads
from ..errors import NonFiniteGradientError, SpecError
from .comm import Comm, gather_rows

Mode = Literal["exact", "local"]
MODES = ("exact", "local")


def _flat_sum(parts: dict[str, Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts.values()]) if parts else torch.zeros(0)


def _unflat(flat: Tensor, like: dict[str, tuple[int, ...]]) -> Grads:
    out, start = {}, 0
    for n, shape in like.items():
        size = math.prod(shape)
        out[n] = flat[start : start + size].reshape(shape)
        start += size
    return out


def _topk_padded(x: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` largest (or smallest) values per coordinate of ``x`` ``[n, ...]`` ->
    ``[k, ...]``, padded with -inf (+inf) when ``n < k``."""
    if x.shape[0] < k:
        fill = float("-inf") if largest else float("inf")
        x = torch.cat([x, x.new_full((k - x.shape[0], *x.shape[1:]), fill)])
    return torch.topk(x, k, dim=0, largest=largest, sorted=True).values


class GlobalAggregation:
    """Runs an :class:`~gradsift.aggregate.Aggregator` over the shards of all ranks.

    Args:
        aggregator: any aggregator (chains included).
        comm: the process group (:class:`~gradsift.distributed.comm.Comm`).
        mode: ``"exact"`` or ``"local"`` (see the module docstring).

    The state has the same structure as ``aggregator.init(...)``'s and is equal on every
    rank (in ``"exact"`` mode), so a checkpoint of rank 0 resumes on any number of ranks.
    """

    def __init__(self, aggregator: Aggregator, comm: Comm, mode: Mode = "exact"):
        if mode not in MODES:
            raise SpecError(f"distributed mode must be one of {MODES}, got '{mode}'")
        self.aggregator, self.comm, self.mode = aggregator, comm, mode

    # ---------------------------------------------------------------- entry points
    def update(self, grads: Grads, state: Any) -> tuple[Grads, Any]:
        """This rank's per-example gradients (name -> ``[b_r, *shape]``) -> the global
        update (name -> ``shape``, equal on every rank) and the new state."""
        if self.mode == "local":
            return self._local_then_mean(grads, state)
        self._checked = False
        out, state, _ = self._apply(self.aggregator, grads, state, is_global=False)
        return out, state

    def update_batch(self, batch: Grads, n: int, state: Any) -> tuple[Grads, Any]:
        """This rank's mean gradient over its ``n`` examples -> the global update, for
        aggregators that take batch gradients (``rm3``): the global mean is formed first."""
        mean = self._global_mean_of_means(batch, n)
        return self.aggregator.update(mean, state)

    # ---------------------------------------------------------------- helpers
    def _sizes(self, n: int) -> list[int]:
        return [int(v) for v in self.comm.all_gather(torch.tensor([n], dtype=torch.long))]

    def _global_mean_of_means(self, batch: Grads, n: int) -> Grads:
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        flat = _flat_sum({k: (v * n if n > 0 else torch.zeros_like(v)) for k, v in batch.items()})
        total = self.comm.all_reduce_sum(torch.cat([flat, flat.new_tensor([float(n)])]))
        b = float(total[-1])
        return _unflat(total[:-1] / b if b > 0 else torch.zeros_like(total[:-1]), shapes)

    def _check_finite(self, grads: Grads, who: str) -> None:
        """Raise on every rank when any rank's gradients hold NaN or inf (a single rank
        raising alone would leave the others waiting in the next collective)."""
        ok = A.finite_rows(grads)
        bad = 0 if ok is None else int((~ok).sum())
        total = int(self.comm.all_reduce_sum(torch.tensor([float(bad)]))[0])
        if total:
            if bad:
                A._check_finite(grads, who)  # raises with this rank's positions
            raise NonFiniteGradientError(
                f"{who}: per-example gradients of {total} example(s) on another rank hold NaN "
                "or inf. Lower the learning rate or check the data; to drop such examples, "
                "chain gs.aggregate.drop_nonfinite() first (CLI/fit: on_nonfinite='drop')."
            )
        self._checked = True

    def _local_then_mean(self, grads: Grads, state: Any) -> tuple[Grads, Any]:
        self._check_finite(grads, self.aggregator.name)
        n = next(iter(grads.values())).shape[0] if grads else 0
        out, state = self.aggregator.update(grads, state)
        return self._global_mean_of_means(out, n), state

    # ---------------------------------------------------------------- exact
    def _apply(self, agg: Aggregator, grads: Grads, state: Any, is_global: bool) -> tuple[Grads, Any, bool]:
        """Apply ``agg``; ``is_global`` says whether ``grads`` are already the same on every
        rank (after a reduction or a full gather) rather than this rank's shard."""
        if agg.parts:
            states = []
            for part, s in zip(agg.parts, state):
                grads, s, is_global = self._apply(part, grads, s, is_global)
                states.append(s)
            return grads, tuple(states), is_global
        if is_global or agg.input == "batch":
            out, state = agg.update(grads, state)
            return out, state, True
        if agg.kind == "drop_nonfinite":
            out, new = agg.update(grads, state)
            dropped = int(self.comm.all_reduce_sum(torch.tensor([float(new - state)]))[0])
            return out, state + dropped, False
        if not self._checked:
            self._check_finite(grads, agg.name)
        if agg.example_wise:
            out, state = agg.update(grads, state)
            return out, state, False
        if agg.output == "batch":
            reduced = self._reduce(agg, grads)
            if reduced is not None:
                return reduced, state, True
        sizes = self._sizes(next(iter(grads.values())).shape[0] if grads else 0)
        full = {n: gather_rows(self.comm, g, sizes) for n, g in grads.items()}
        out, state = agg.update(full, state)
        return out, state, True

    def _reduce(self, agg: Aggregator, grads: Grads) -> Grads | None:
        """The global result of a per-example -> batch reducer, or ``None`` if it has no
        distributed form (then the caller gathers everything)."""
        n = next(iter(grads.values())).shape[0] if grads else 0
        sizes = self._sizes(n)
        b = sum(sizes)
        offset = sum(sizes[: self.comm.rank])
        if b == 0:
            return {k: g.new_zeros(g.shape[1:]) for k, g in grads.items()}
        kind, opts = agg.kind, agg.options
        if kind == "winsorize":
            c = min(int(opts["c"]), (b - 1) // 2)
            return self._mean(grads, b) if c == 0 else self._winsorize(grads, b, c)
        if kind == "trimmed_mean":
            k = min(int(math.floor(float(opts["fraction"]) * b)), (b - 1) // 2)
            return self._mean(grads, b) if k == 0 else self._trimmed(grads, b, k)
        if kind == "m3":
            return self._mean(grads, b) if b < 3 else self._m3(grads, b, offset)
        if kind == "mean":
            return self._mean(grads, b)
        if agg.per_coordinate is not None:
            return {k: agg.per_coordinate(gather_rows(self.comm, g, sizes)) for k, g in grads.items()}
        return None

    def _all_reduce(self, parts: dict[str, Tensor]) -> Grads:
        shapes = {k: tuple(v.shape) for k, v in parts.items()}
        return _unflat(self.comm.all_reduce_sum(_flat_sum(parts)), shapes)

    def _mean(self, grads: Grads, b: int) -> Grads:
        return {k: v / b for k, v in self._all_reduce({k: g.sum(0) for k, g in grads.items()}).items()}

    def _bounds(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Global k-th smallest and k-th largest per coordinate of the rows of all ranks."""
        top = torch.cat(self.comm.all_gather(_topk_padded(x, k, largest=True)))
        bottom = torch.cat(self.comm.all_gather(_topk_padded(x, k, largest=False)))
        upper = torch.topk(top, k, dim=0, largest=True, sorted=True).values[-1]
        lower = torch.topk(bottom, k, dim=0, largest=False, sorted=True).values[-1]
        return lower, upper

    def _winsorize(self, grads: Grads, b: int, c: int) -> Grads:
        sums = {}
        for k, g in grads.items():
            lower, upper = self._bounds(g, c + 1)
            sums[k] = torch.minimum(torch.maximum(g, lower), upper).sum(0)
        return {k: v / b for k, v in self._all_reduce(sums).items()}

    def _trimmed(self, grads: Grads, b: int, k: int) -> Grads:
        # l, u: the smallest and largest kept values. Kept: everything strictly between,
        # plus (#<=l - k) copies of l and (#>=u - k) copies of u; all of it is l if l == u.
        stats, bounds = {}, {}
        for name, g in grads.items():
            lower, upper = self._bounds(g, k + 1)
            inside = (g > lower) & (g < upper)
            stats[name] = torch.stack([
                torch.where(inside, g, torch.zeros_like(g)).sum(0),
                (g <= lower).sum(0).to(g.dtype),
                (g >= upper).sum(0).to(g.dtype),
            ])
            bounds[name] = (lower, upper)
        out = {}
        for name, s in self._all_reduce(stats).items():
            lower, upper = bounds[name]
            kept = s[0] + lower * (s[1] - k) + upper * (s[2] - k)
            out[name] = torch.where(lower == upper, lower, kept / (b - 2 * k))
        return out

    def _m3(self, grads: Grads, b: int, offset: int) -> Grads:
        groups = A._group_slices(b, 3)
        sums = {}
        for name, g in grads.items():
            n = g.shape[0]
            parts = []
            for s in groups:
                lo, hi = max(s.start, offset) - offset, min(s.stop, offset + n) - offset
                parts.append(g[lo:hi].sum(0) if hi > lo else g.new_zeros(g.shape[1:]))
            sums[name] = torch.stack(parts)
        sizes = [s.stop - s.start for s in groups]
        out = {}
        for name, s in self._all_reduce(sums).items():
            means = [s[i] / sizes[i] for i in range(3)]
            out[name] = A.median3(*means)
        return out
