"""``clip``: per-example L2 clipping, ``g_i * min(1, C / (||g_i|| + 1e-6))``.

Example-wise (runs on any shard alone). Layer-wise form: the factors come from the
squared per-example norms (ghost norms from the recorded activations and output
gradients), so ``clip > mean`` is one weighted sum per layer: the per-example gradients
never exist (book-keeping).
"""

from __future__ import annotations

import math

import torch

from .base import (Aggregator, Grads, RowScale, State, check_finite, clip_factors,
                   register_aggregator, row_view, squared_norms)


def clip_scales(norms_sq: Grads, max_norm: float, per_layer: bool) -> Grads:
    """Clip factors name -> ``[B]`` from squared per-example norms name -> ``[B]``: one
    total-norm factor for every parameter, or (``per_layer``) each parameter to
    ``C / sqrt(L)``."""
    if not norms_sq:
        return {}
    if per_layer:
        bound = max_norm / math.sqrt(len(norms_sq))
        return {n: clip_factors(v.sqrt(), bound) for n, v in norms_sq.items()}
    f = clip_factors(torch.stack(list(norms_sq.values())).sum(0).sqrt(), max_norm)
    return {n: f for n in norms_sq}


@register_aggregator("clip")
def clip(max_norm: float = 1.0, *, per_layer: bool = False) -> Aggregator:
    """Per-example L2 clipping of the total gradient norm to ``max_norm`` (C).

    Args:
        max_norm: C, the bound on each example's total gradient norm.
        per_layer: clip each layer separately to ``C / sqrt(L)`` (L = number of layers),
            which also bounds the total norm by C.
    """
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"clip: max_norm must be > 0, got {max_norm}")

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        check_finite(grads, "clip")
        f = clip_scales(squared_norms(grads), max_norm, per_layer)
        return {n: g * row_view(f[n], g) for n, g in grads.items()}, state

    name = f"clip(max_norm={max_norm:g}{', per_layer' if per_layer else ''})"
    return Aggregator(name, lambda params: (), update, "per_example", "per_example", kind="clip",
                      options={"max_norm": max_norm, "per_layer": per_layer}, example_wise=True,
                      row_scale=RowScale(lambda norms_sq: clip_scales(norms_sq, max_norm, per_layer)))
