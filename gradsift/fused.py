"""Layer-by-layer (fused) aggregation of per-example gradients.

For an aggregator of the form ``[drop_nonfinite] > [clip] > reducer > [batch-level
steps]`` where ``reducer`` works per coordinate (mean, winsorize, trimmed mean,
coordinate median, m3), the per-example gradients of one layer are formed, clipped,
reduced and freed before the next layer's are formed. Peak memory is about
``B x (largest layer)`` instead of ``B x (all parameters)``.

* Clipping needs each example's *total* norm before any layer can be scaled: the norms
  come first, from ghost norms over the same recorded activations and output gradients
  (one forward and one backward pass in all: the book-keeping trick).
* ``mean`` (after optional clipping) never forms per-example gradients at all: it is a
  weighted sum ``sum_i w_i g_i`` computed from activations and output gradients, so
  ``clip > mean`` (DP-SGD's clipped sum) costs about one ordinary backward pass.
* Batches holding a non-finite per-example gradient are handed to the unfused path, which
  drops them (``drop_nonfinite``) or raises exactly as it would.

Only hookable models (see :mod:`gradsift.layers`) are fused; :func:`gradsift.engine.
aggregated_gradient` runs the unfused path for the others.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import layers
from .aggregate import Aggregator, clip_factors, mean_of

Grads = dict[str, Tensor]


@dataclass
class FusedPlan:
    """How to run an aggregator layer by layer.

    Attributes:
        reducer: ``[B, ...] -> [...]`` per-coordinate reduction.
        is_mean: the reducer is the plain mean (computed as a weighted sum).
        clip: ``(max_norm, per_layer)`` or ``None``.
        positions: index of each stage in the chain's parts (``None`` if absent):
            ``"drop"``, ``"clip"``, ``"reducer"``.
        tail: batch-to-batch aggregators after the reducer, with their part indices.
        chained: the aggregator is a :func:`~gradsift.aggregate.chain` (state is a tuple).
    """

    reducer: Callable[[Tensor], Tensor]
    is_mean: bool
    clip: tuple[float, bool] | None = None
    positions: dict[str, int | None] = field(default_factory=dict)
    tail: list[tuple[int, Aggregator]] = field(default_factory=list)
    chained: bool = False


def plan(aggregator: Aggregator) -> FusedPlan | None:
    """A :class:`FusedPlan` for ``aggregator``, or ``None`` when it cannot be fused."""
    parts = list(aggregator.parts) if aggregator.parts else [aggregator]
    positions: dict[str, int | None] = {"drop": None, "clip": None, "reducer": None}
    clip = None
    i = 0
    if i < len(parts) and parts[i].kind == "drop_nonfinite":
        positions["drop"] = i
        i += 1
    if i < len(parts) and parts[i].kind == "clip":
        positions["clip"] = i
        clip = (float(parts[i].options["max_norm"]), bool(parts[i].options["per_layer"]))
        i += 1
    if i >= len(parts) or parts[i].per_coordinate is None or getattr(parts[i], "needs", ()):
        return None
    reducer = parts[i].per_coordinate
    positions["reducer"] = i
    tail = []
    for j in range(i + 1, len(parts)):
        p = parts[j]
        if p.input != "batch" or p.parts or getattr(p, "needs", ()):
            return None
        tail.append((j, p))
    return FusedPlan(
        reducer=reducer, is_mean=reducer is mean_of, clip=clip, positions=positions,
        tail=tail, chained=bool(aggregator.parts),
    )


def _factors(p: FusedPlan, norms_sq: Grads) -> tuple[Tensor | None, dict[str, Tensor] | None]:
    """Clip factors: total ``[B]`` or per parameter name -> ``[B]``."""
    if p.clip is None:
        return None, None
    max_norm, per_layer = p.clip
    if per_layer:
        bound = max_norm / len(norms_sq) ** 0.5
        return None, {n: clip_factors(v.sqrt(), bound) for n, v in norms_sq.items()}
    total = torch.stack(list(norms_sq.values())).sum(0).sqrt()
    return clip_factors(total, max_norm), None


def fused_update(
    model: nn.Module, rec: layers.Recording, p: FusedPlan
) -> Grads | None:
    """The reduced update (name -> ``param.shape``) from a recording, layer by layer.

    Returns ``None`` when some per-example gradient is not finite (the caller then runs
    the unfused path, which drops or reports those examples).
    """
    b = rec.losses.shape[0]
    factor, layer_factor = None, None
    if p.clip is not None or p.positions["drop"] is not None:
        norms_sq = layers.recording_norms_sq(model, rec)
        if not all(bool(torch.isfinite(v).all()) for v in norms_sq.values()):
            return None
        factor, layer_factor = _factors(p, norms_sq)
    names = layers.parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    shared = {n for n, k in Counter(names.values()).items() if k > 1}
    update: Grads = {}
    pending: Grads = {}  # per-example grads of shared parameters, reduced at the end

    def scale(name: str) -> Tensor | None:
        if layer_factor is not None:
            return layer_factor[name]
        return factor

    for lname, cap in rec.captures.items():
        own = {local: names[(lname, local)] for local in layers.own_trainable(cap.module)}
        if p.is_mean and not (set(own.values()) & shared):
            # One weight vector per layer, or per parameter when clipping per layer.
            if layer_factor is None:
                w = (factor if factor is not None else rec.losses.new_ones(b)) / b
                for local, g in layers.layer_weighted_sum(cap, w).items():
                    update[own[local]] = g
            else:
                for local, name in own.items():
                    g = layers.layer_weighted_sum(cap, layer_factor[name] / b)[local]
                    update[name] = g
            continue
        if set(own.values()) & shared:
            for local, g in layers.layer_grads(cap).items():
                name = own[local]
                if name in shared:
                    pending[name] = pending[name] + g if name in pending else g
                else:  # the layer's unshared parameter
                    part = _reduce_one(p, g, scale(name))
                    if part is None:
                        return None
                    update[name] = part
            continue
        reduced = layers.layer_reduced(cap, p.reducer, lambda local: scale(own[local]))
        if reduced is None:
            return None
        for local, value in reduced.items():
            update[own[local]] = value
    for name, g in pending.items():
        part = _reduce_one(p, g, scale(name))
        if part is None:
            return None
        update[name] = part
    for name, par in model.named_parameters():
        if par.requires_grad and name not in update:
            update[name] = torch.zeros_like(par)
    if p.is_mean and not all(bool(torch.isfinite(u).all()) for u in update.values()):
        return None
    return update


def _reduce_one(p: FusedPlan, g: Tensor, f: Tensor | None) -> Tensor | None:
    """Scale ``[B, ...]`` per-example gradients by ``f [B]``, then reduce (None if not finite)."""
    if f is not None:
        g = g * f.view(-1, *([1] * (g.ndim - 1)))
    if not bool(torch.isfinite(g.sum())):
        return None
    return p.reducer(g)


def run_tail(p: FusedPlan, update: Grads, state: Any) -> tuple[Grads, Any]:
    """Apply the batch-level aggregators after the reducer; return the new full state."""
    if not p.chained:
        return update, state
    new_state = list(state)
    for j, agg in p.tail:
        update, new_state[j] = agg.update(update, new_state[j])
    return update, tuple(new_state)
