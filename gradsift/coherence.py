"""Gradient coherence (Chatterjee & Zielinski, "On the Generalization Mystery").

For per-example gradients g_1..g_m::

    alpha       = ||mean_i g_i||^2 / mean_i ||g_i||^2        in [0, 1]
    m_coherence = m * alpha       (about 1 when the g_i are orthogonal, m when all agree)
    alpha_ratio = alpha / (1/m)   (= m_coherence: alpha relative to the orthogonal baseline)

Ghost coherence: every statistic above needs only the ``[m, m]`` Gram matrix
``K_ij = g_i . g_j``, and :func:`gradient_gram` gets it exactly from one forward and one
backward pass with hooks, from each layer's activation and output-gradient Grams, without
forming the per-example gradients (each layer rule's ``gram``, :func:`gradsift.layers.layer_gram`:
the ghost form for Linear and Conv, per-layer per-example gradients for the others). :func:`gram_coherence` then gives m-coherence, per-class
coherence and each example's alignment with the rest of the batch::

    K = gradient_gram(model, loss_fn, x, y)             # [B, B] float64
    stats = gram_coherence(K, labels=y)                 # m_coherence, per_class, alignment [B]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import layers

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
    parts = {}
    for n, g in grads.items():
        flat = g.detach().flatten(1).double()
        parts[n] = (flat.mean(0).square().sum(), flat.square().sum(1).mean())
    return _summarize(parts, m, per_layer)


def _summarize(parts: dict[str, tuple[Tensor, Tensor]], m: int, per_layer: bool) -> dict:
    """The statistics from name -> ``(||mean_i g_i||^2, mean_i ||g_i||^2)`` (float64
    scalars): the whole model's from the sums over parameters, and each parameter's."""
    total_mean_sq = sum((a.cpu() for a, _ in parts.values()), torch.zeros((), dtype=torch.float64))
    total_sq_mean = sum((b.cpu() for _, b in parts.values()), torch.zeros((), dtype=torch.float64))
    out = _stats(total_mean_sq, total_sq_mean, m)
    if per_layer:
        out["layers"] = {n: _stats(a, b, m) for n, (a, b) in parts.items()}
    return out


def model_coherence(model: nn.Module, loss_fn, inputs, targets: Tensor, *, per_layer: bool = False) -> dict:
    """:func:`coherence` of the per-example gradients of ``loss_fn(model(inputs), targets)``,
    without forming them.

    ``alpha`` needs only ``||mean_i g_i||^2`` and ``mean_i ||g_i||^2``, per parameter: one
    forward and one backward pass with hooks give both, the first as a weighted sum of each
    layer's activations and output gradients (``1/m`` per example), the second as ghost
    norms (:func:`gradsift.layers.recording_norms_sq`). A model the hooks cannot take gets
    the per-example gradients from :func:`gradsift.engine.per_example` instead.

    Args:
        inputs: ``[m, ...]`` (or a tuple/dict of them); targets: ``[m]``.
        per_layer: also return ``"layers"`` (name -> statistics), as :func:`coherence`.

    Returns:
        as :func:`coherence` (equal up to float rounding: the sums are float32, the
        statistics float64).
    """
    from .engine import per_example, trainable_parameters

    try:
        layers.check_hookable(model)
        rec = layers.record(model, loss_fn, inputs, targets)
    except layers.NotHookable:
        return coherence(per_example(model, loss_fn, inputs, targets).grads, per_layer=per_layer)
    m = rec.losses.shape[0]
    if m == 0:
        raise ValueError("coherence: needs at least one example")
    norms_sq = layers.recording_norms_sq(model, rec)
    w = torch.full((m,), 1.0 / m, dtype=rec.losses.dtype, device=rec.losses.device)
    means: Grads = {}
    for name, g in layers.iter_layer_results(model, rec, lambda cap: layers.layer_weighted_sum(cap, w)):
        means[name] = means[name] + g if name in means else g
    zero = torch.zeros((), dtype=torch.float64)
    parts = {name: (means[name].double().square().sum() if name in means else zero, norms_sq[name].double().mean())
             for name in trainable_parameters(model)}
    return _summarize(parts, m, per_layer)


# ---------------------------------------------------------------- from the B x B Gram matrix

def gradient_gram(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor, *,
                  per_layer: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The exact ``[B, B]`` Gram matrix ``K_ij = g_i . g_j`` of the per-example gradients
    of ``loss_fn(model(inputs), targets)`` (one forward and one backward pass with hooks;
    per-layer Grams from :func:`gradsift.layers.layer_gram`, which never forms per-example
    gradients for Linear and Conv layers), summed in float64.

    Args:
        model: a hookable model (:func:`gradsift.layers.check_hookable`).
        loss_fn: ``(outputs, targets) -> [B]``.
        inputs: ``[B, ...]``; targets: ``[B]``.
        per_layer: also return parameter name -> its ``[B, B]`` Gram.

    Returns:
        ``K`` ``[B, B]`` float64 (and the per-parameter Grams).
    """
    layers.check_hookable(model)
    rec = layers.record(model, loss_fn, inputs, targets)
    per: dict[str, Tensor] = {}
    for name, k in layers.iter_layer_results(model, rec, layers.layer_gram):
        k = k.double()
        per[name] = per[name] + k if name in per else k
    b = inputs.shape[0]
    total = sum(per.values()) if per else torch.zeros(b, b, dtype=torch.float64)
    return (total, per) if per_layer else total


def gram_coherence(gram: Tensor, labels: Tensor | None = None) -> dict:
    """Coherence statistics from the Gram matrix ``[B, B]`` of per-example gradients.

    Returns:
        ``{"alpha", "m_coherence", "alpha_ratio", "m"}`` as :func:`coherence` (equal to it
        for the same gradients), ``"alignment"``: ``[B]`` cosine of each ``g_i`` with the
        mean of the others, ``g_i . mean_{j != i} g_j / (||g_i|| ||mean_{j != i} g_j||)``
        (low or negative: the example pulls against the batch; NaN if undefined), and with
        ``labels`` ``[B]``, ``"per_class"``: class -> ``{"alpha", "m_coherence", "m"}``
        over the examples of that class.
    """
    k = gram.double()
    m = k.shape[0]
    diag = k.diagonal()
    out = _stats(k.sum() / m**2, diag.mean(), m)
    row = k.sum(1)
    total = k.sum()
    with torch.no_grad():
        rest = (total - 2 * row + diag).clamp_min(0)
        denom = (diag.clamp_min(0) * rest).sqrt()
        out["alignment"] = torch.where(denom > 0, (row - diag) / denom, torch.full_like(denom, float("nan")))
    if labels is not None:
        # one pass for every class: with the one-hot [B, C] matrix Y, (Y^T K Y)_cc is the
        # sum of class c's block of K and Y^T diag(K) its diagonal's sum
        classes, index = torch.unique(labels.flatten().cpu(), return_inverse=True)
        onehot = torch.nn.functional.one_hot(index, len(classes)).to(k.dtype).to(k.device)
        block_sums = ((onehot.T @ k) * onehot.T).sum(1)
        diag_sums = onehot.T @ diag
        counts = onehot.sum(0)
        out["per_class"] = {int(c): _stats(block_sums[j] / counts[j] ** 2, diag_sums[j] / counts[j], int(counts[j]))
                            for j, c in enumerate(classes.tolist())}
    return out
