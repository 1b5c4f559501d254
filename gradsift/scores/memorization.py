"""Feldman & Zhang memorization scores from models trained on random subsets.

    mem(i) = P[model correct on i | i in its training subset]
           - P[model correct on i | i not in its training subset]

estimated from ``K`` models, each trained on a random subset holding a fraction ``r`` of
the training set (Feldman, "Does Learning Require Memorization?"; Feldman & Zhang 2020).
The standard error is that of a difference of two independent proportions,
``sqrt(p_in (1 - p_in) / n_in + p_out (1 - p_out) / n_out)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data import Dataset
from .members import ModelFn, predict_members, train_members


def subset_masks(n: int, n_models: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """``[K, N]`` bool: each row holds exactly ``round(fraction * N)`` random examples."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = max(1, int(round(fraction * n)))
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_models, n, dtype=torch.bool)
    for k in range(n_models):
        masks[k, torch.randperm(n, generator=g)[:size]] = True
    return masks


def memorization_estimate(in_mask: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """The estimator, from ``K`` models' subsets and correctness.

    Args:
        in_mask: ``[K, N]`` bool, example ``i`` was in model ``k``'s training subset.
        correct: ``[K, N]`` bool, model ``k`` classifies example ``i`` correctly.

    Returns:
        DataFrame with ``N`` rows: ``mem, mem_se, p_in, p_out, n_in, n_out``
        (``mem``/``mem_se`` NaN when an example was never in, or never out).
    """
    m = np.asarray(in_mask, dtype=bool)
    c = np.asarray(correct, dtype=bool)
    if m.shape != c.shape or m.ndim != 2:
        raise ValueError(f"in_mask and correct must both be [K, N], got {m.shape} and {c.shape}")
    n_in, n_out = m.sum(0), (~m).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = (c & m).sum(0) / n_in
        p_out = (c & ~m).sum(0) / n_out
        se = np.sqrt(p_in * (1 - p_in) / n_in + p_out * (1 - p_out) / n_out)
    return pd.DataFrame({"mem": p_in - p_out, "mem_se": se, "p_in": p_in, "p_out": p_out,
                         "n_in": n_in, "n_out": n_out})


def memorization_scores(
    data: Dataset,
    model_fn: ModelFn,
    *,
    n_models: int = 32,
    fraction: float = 0.7,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    vectorize: bool | None = None,
    backend=None,
) -> pd.DataFrame:
    """Train ``n_models`` models on random ``fraction``-subsets of ``data`` (all at once
    with ``torch.func`` when the model allows, see :func:`~gradsift.scores.members.train_members`)
    and estimate memorization.

    ``backend`` (:mod:`gradsift.distributed.backends`, e.g. Ray) trains the models in
    parallel tasks; the scores are the same as in this process for the same seeds.

    Returns:
        DataFrame indexed by ``example_id``: ``mem, mem_se, p_in, p_out, n_in, n_out``.
    """
    x, y = data.tensors()
    masks = subset_masks(len(data), n_models, fraction, seed)
    models = train_members(model_fn, x, y, masks, epochs=epochs, batch_size=batch_size, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, seed=seed, vectorize=vectorize,
                           backend=backend)
    correct = (predict_members(models, x).argmax(-1) == y).numpy()
    out = memorization_estimate(masks.numpy(), correct)
    out.index = pd.Index(data.example_ids, name="example_id")
    return out
