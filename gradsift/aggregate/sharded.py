"""Exact aggregation across ranks: :class:`GlobalAggregation`.

Each rank holds the per-example gradients of its shard of the global batch (the shards
concatenated in rank order are the global batch, so order-dependent aggregators such as
``m3`` are well defined). :class:`GlobalAggregation` walks the stages of an aggregator
and asks each what it can do:

* ``sharded`` form (``weighted_sums`` reducers get one for free): run it -- exact, with
  its own communication (``mean``/``clip > mean``: one all-reduce of ``P``; ``m3``:
  ``3P``; ``winsorize(c)``: all-gather of ``2(c+1)P`` then all-reduce of ``P``; ...);
* example-wise (``clip``): run it on the shard, no communication;
* ``per_coordinate`` without a sharded form (``coordinate_median``): gather every
  rank's rows, one parameter at a time, and reduce;
* anything else: gather all per-example gradients, run it unchanged on every rank.

Stages after the reduction (batch -> batch: ``rm3``, noise) run on every rank on
identical inputs, so random ones must draw from generators seeded alike on all ranks.

Mode ``"local"`` (clearly not exact): each rank aggregates its own shard and the results
are averaged weighted by shard size (one all-reduce of ``P``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import NonFiniteGradientError, SpecError
from .base import Aggregator, Comm, Grads, Shard, apply, batch_size, check_finite, finite_rows

Mode = Literal["exact", "local"]
MODES = ("exact", "local")


def gather_rows(comm: Comm, t: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate ``t`` ``[b_r, *shape]`` of every rank in rank order (``sizes``: every
    rank's ``b_r``; each pads to the largest and the padding is cut)."""
    most = max(sizes)
    padded = t if t.shape[0] == most else torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = comm.all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


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
        self._checked = False

    # ---------------------------------------------------------------- entry points
    def update(self, grads: Grads, state: Any, **extras: Tensor) -> tuple[Grads, Any]:
        """This rank's per-example gradients (name -> ``[b_r, *shape]``) -> the global
        update (name -> ``shape``, equal on every rank) and the new state."""
        if self.mode == "local":
            return self._local_then_mean(grads, state, extras)
        self._checked = False
        out, state, _ = self._apply(self.aggregator, grads, state, False, extras)
        return out, state

    def update_batch(self, batch: Grads, n: int, state: Any, **extras: Tensor) -> tuple[Grads, Any]:
        """This rank's mean gradient over its ``n`` examples -> the global update, for
        aggregators that take batch gradients (``rm3``): the global mean is formed first."""
        return apply(self.aggregator, self.global_mean(batch, n), state, **extras)

    # ---------------------------------------------------------------- helpers
    def shard(self, n: int) -> Shard:
        """This rank's :class:`Shard` for ``n`` local examples (one small collective)."""
        sizes = [int(v) for v in self.comm.all_gather(torch.tensor([n], dtype=torch.long))]
        return Shard(self.comm, sizes, lambda t: gather_rows(self.comm, t, sizes), self.check_finite)

    def global_mean(self, batch: Grads, n: int) -> Grads:
        """Mean over all ranks' examples from each rank's mean of its ``n`` examples."""
        if not batch:
            return {}
        flat = torch.cat([(v * n if n > 0 else torch.zeros_like(v)).reshape(-1) for v in batch.values()])
        total = self.comm.all_reduce_sum(torch.cat([flat, flat.new_tensor([float(n)])]))
        b = float(total[-1])
        mean = total[:-1] / b if b > 0 else torch.zeros_like(total[:-1])
        out, start = {}, 0
        for k, v in batch.items():
            out[k] = mean[start : start + v.numel()].reshape(v.shape)
            start += v.numel()
        return out

    def check_finite(self, grads: Grads, who: str) -> None:
        """Raise on every rank when any rank's gradients hold NaN or inf (a single rank
        raising alone would leave the others waiting in the next collective)."""
        if self._checked:
            return
        ok = finite_rows(grads)
        bad = 0 if ok is None else int((~ok).sum())
        total = int(self.comm.all_reduce_sum(torch.tensor([float(bad)]))[0])
        if total:
            if bad:
                check_finite(grads, who)  # raises with this rank's positions
            raise NonFiniteGradientError(
                f"{who}: per-example gradients of {total} example(s) on another rank hold NaN "
                "or inf. Lower the learning rate or check the data; to drop such examples, "
                "chain gs.aggregate.drop_nonfinite() first (CLI/fit: on_nonfinite='drop')."
            )
        self._checked = True

    def _local_then_mean(self, grads: Grads, state: Any, extras: dict) -> tuple[Grads, Any]:
        self.check_finite(grads, self.aggregator.name)
        self._checked = False
        out, state = apply(self.aggregator, grads, state, **extras)
        return self.global_mean(out, batch_size(grads) or 0), state

    # ---------------------------------------------------------------- exact
    def _apply(self, agg: Aggregator, grads: Grads, state: Any, is_global: bool,
               extras: dict) -> tuple[Grads, Any, bool]:
        """Apply ``agg``; ``is_global`` says whether ``grads`` are already the same on every
        rank (after a reduction or a full gather) rather than this rank's shard."""
        if agg.parts:
            states = []
            for part, s in zip(agg.parts, state):
                grads, s, is_global = self._apply(part, grads, s, is_global, extras)
                states.append(s)
            return grads, tuple(states), is_global
        if is_global or agg.input == "batch":
            out, state = apply(agg, grads, state, **extras)
            return out, state, True
        n = batch_size(grads) or 0
        if agg.sharded is not None and not agg.needs:
            out, state = agg.sharded(grads, state, self.shard(n))
            return out, state, agg.output == "batch"
        self.check_finite(grads, agg.name)
        if agg.example_wise:
            out, state = apply(agg, grads, state, **extras)
            return out, state, False
        shard = self.shard(n)
        if agg.output == "batch" and agg.per_coordinate is not None:
            if shard.total == 0:
                return {k: g.new_zeros(g.shape[1:]) for k, g in grads.items()}, state, True
            return {k: agg.per_coordinate(shard.gather_rows(g)) for k, g in grads.items()}, state, True
        full = {k: shard.gather_rows(g) for k, g in grads.items()}
        full_extras = {k: shard.gather_rows(v) for k, v in extras.items() if k in agg.needs}
        out, state = apply(agg, full, state, **full_extras)
        return out, state, True
