"""Gradient coherence (Chatterjee & Zielinski, "On the Generalization Mystery").

For per-example gradients g_1..g_m::

    alpha       = ||mean_i g_i||^2 / mean_i ||g_i||^2        in [0, 1]
    m_coherence = m * alpha       (about 1 when the g_i are orthogonal, m when all agree)
    alpha_ratio = alpha / (1/m)   (= m_coherence: alpha relative to the orthogonal baseline)
"""

from __future__ import annotations

import torch
from torch import Tensor

Grads = dict[str, Tensor]


def _stats(mean_sq: Tensor, sq_mean: Tensor, m: int) -> dict[str, float]:
    alpha = float(mean_sq / sq_mean) if float(sq_mean) > 0 else float("nan")
    return {"alpha": alpha, "m_coherence": m * alpha, "alpha_ratio": alpha * m, "m": m}


def coherence(grads: Grads, *, per_layer: bool = False) -> dict:
    """Coherence of per-example gradients.

    Args:
        grads: name -> ``[m, *param.shape]`` per-example gradients.
        per_layer: also return ``"layers"``: name -> the same statistics for that layer.

    Returns:
        ``{"alpha", "m_coherence", "alpha_ratio", "m"}`` for the whole model (all layers
        concatenated), plus ``"layers"`` when asked. ``alpha`` is NaN when every gradient is 0.
    """
    if not grads:
        raise ValueError("coherence: no gradients given")
    m = next(iter(grads.values())).shape[0]
    if m == 0:
        raise ValueError("coherence: needs at least one example")
    layers = {}
    total_mean_sq = torch.zeros((), dtype=torch.float64)
    total_sq_mean = torch.zeros((), dtype=torch.float64)
    for n, g in grads.items():
        flat = g.detach().flatten(1).double()
        mean_sq = flat.mean(0).square().sum()
        sq_mean = flat.square().sum(1).mean()
        total_mean_sq += mean_sq
        total_sq_mean += sq_mean
        if per_layer:
            layers[n] = _stats(mean_sq, sq_mean, m)
    out = _stats(total_mean_sq, total_sq_mean, m)
    if per_layer:
        out["layers"] = layers
    return out
