"""``gaf``: Gradient Agreement Filtering (Chaubard, Eddy & Kochenderfer, "Beyond Gradient
Averaging in Parallel Optimization: Improved Robustness through Gradient Agreement
Filtering", 2024).

Math: the batch is split in order into ``k`` contiguous micro-batches (sizes as equal as
possible; ``k = B`` gives one example each) with mean gradients ``m_1 .. m_k``. Going
through them in order, a running sum starts at ``m_1`` and takes ``m_j`` in when its
cosine distance to the running sum is at most ``threshold``::

    s = m_1, n = 1
    for j = 2..k:  if 1 - cos(s, m_j) <= threshold:  s += m_j, n += 1
    u = s / n

(a zero vector has cosine 0 with anything). Micro-gradients that disagree with what
the batch agrees on are filtered out before averaging.

Layer-wise form: the ``m_j`` are ``k`` weighted sums (indicator / size), so each layer
gives its ``[k, *shape]`` micro-batch means straight from activations and output
gradients; the filter needs only the ``k x k`` Gram matrix of the ``m_j`` over the whole
model, summed over layers. Sharded form: one all-reduce of the ``k P`` partial sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, Grads, WeightedSums, group_weights, reducer, register_aggregator


def agreement_filter(gram: Tensor, threshold: float) -> list[int]:
    """Indices of the micro-batches kept, from the ``[k, k]`` Gram matrix of their
    gradients (see the module doc)."""
    k = gram.shape[0]
    if k == 0:
        return []
    kept = [0]
    g = gram.double()
    for j in range(1, k):
        idx = torch.tensor(kept)
        dot = float(g[idx, j].sum())
        sq_s = float(g[idx][:, idx].sum())
        sq_j = float(g[j, j])
        denom = (max(sq_s, 0.0) * max(sq_j, 0.0)) ** 0.5
        cos = dot / denom if denom > 0 else 0.0
        if 1.0 - cos <= threshold:
            kept.append(j)
    return kept


def gaf_combine(sums: Grads, threshold: float) -> Grads:
    """name -> ``[k, *shape]`` micro-batch means -> name -> ``shape`` filtered average."""
    if not sums:
        return {}
    k = next(iter(sums.values())).shape[0]
    gram = sum((lambda f: f @ f.T)(s.reshape(k, -1).double()) for s in sums.values())
    kept = agreement_filter(gram, threshold)
    if not kept:
        return {n: s.new_zeros(s.shape[1:]) for n, s in sums.items()}
    idx = torch.tensor(kept, device=next(iter(sums.values())).device)
    return {n: s.index_select(0, idx).mean(0) for n, s in sums.items()}


def gaf_weights(micro_batches: int | None):
    """``(B, dtype, device) -> [k, B]`` micro-batch mean weights (``k = min(m, B)``)."""

    def weights(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        k = b if micro_batches is None else min(micro_batches, b)
        return group_weights(b, k, dtype, device)

    return weights


@register_aggregator("gaf")
def gaf(micro_batches: int | None = 4, threshold: float = 0.97) -> Aggregator:
    """Gradient Agreement Filtering: average the micro-batch gradients that agree in
    cosine with the running sum; see the module doc.

    Args:
        micro_batches: k, contiguous micro-batches per batch (``None``: one per example).
        threshold: the largest cosine distance ``1 - cos`` (in ``[0, 2]``) kept.
    """
    if micro_batches is not None:
        micro_batches = int(micro_batches)
        if micro_batches < 1:
            raise ValueError(f"gaf: micro_batches must be >= 1, got {micro_batches}")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 2.0:
        raise ValueError(f"gaf: threshold is a cosine distance in [0, 2], got {threshold}")
    form = WeightedSums(gaf_weights(micro_batches), lambda sums: gaf_combine(sums, threshold))
    return reducer(f"gaf(micro_batches={micro_batches}, threshold={threshold:g})", "gaf",
                   weighted_sums=form, micro_batches=micro_batches, threshold=threshold)
