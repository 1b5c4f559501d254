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

from typing import Any, Callable

from torch import nn

from ..data import Dataset
from ..ensemble import ModelFn, as_model_fn, mlp_factory, predict_members, subset_masks, train_members, training_arrays
from ..errors import DataError
from .registry import ScoreSettings, register_score


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
    data: Any,
    model_fn: ModelFn | Callable[[], nn.Module],
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
    with ``torch.func`` when the model allows, see :func:`gradsift.ensemble.train_members`)
    and estimate memorization.

    ``backend`` (:mod:`gradsift.backends`, e.g. Ray) trains the models in
    parallel tasks; the scores are the same as in this process for the same seeds.

    ``data``: a :class:`gradsift.data.Dataset`, or a torch ``Dataset`` of ``(inputs,
    target)`` items (ids = positions) or a ``DataLoader`` over one, read in batches.
    ``model_fn``: ``k -> nn.Module``, or a factory of fresh models ``() -> nn.Module``
    (called under each member's seed; :func:`gradsift.ensemble.as_model_fn`).

    Returns:
        DataFrame indexed by ``example_id``: ``mem, mem_se, p_in, p_out, n_in, n_out``.
    """
    if not 0 < fraction < 1:
        raise DataError(f"fraction must be in (0, 1), got {fraction}")
    if n_models < 2:
        raise DataError(f"n_models must be >= 2 (an example needs models with and without it), got {n_models}")
    x, y, example_ids = training_arrays(data)
    model_fn = as_model_fn(model_fn, seed)
    masks = subset_masks(len(y), n_models, fraction, seed)
    models = train_members(model_fn, x, y, masks, epochs=epochs, batch_size=batch_size, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, seed=seed, vectorize=vectorize,
                           backend=backend)
    correct = (predict_members(models, x).argmax(-1) == y).numpy()
    out = memorization_estimate(masks.numpy(), correct)
    out.index = pd.Index(example_ids, name="example_id")
    return out


def memorization(data: Dataset, settings: ScoreSettings, wanted: tuple[str, ...], backend=None) -> pd.DataFrame:
    """The registry's function for ``memorization``: :func:`memorization_scores` with
    ``settings`` (``mem_models`` MLPs on ``mem_fraction`` subsets, ``epochs`` epochs);
    columns ``memorization`` (= ``mem``) and ``mem_se``."""
    mf = mlp_factory(data, width=settings.width, seed=settings.seed + 1000)
    mem = memorization_scores(data, mf, n_models=settings.mem_models, fraction=settings.mem_fraction,
                              epochs=settings.epochs, weight_decay=settings.weight_decay, seed=settings.seed,
                              backend=backend, batch_size=settings.batch_size, lr=settings.lr,
                              momentum=settings.momentum)
    return mem[["mem", "mem_se"]].rename(columns={"mem": "memorization"})


register_score("memorization", kind="function", make=memorization, columns=("memorization", "mem_se"),
               description="Feldman-Zhang P[correct | in] - P[correct | out] from subset models")
