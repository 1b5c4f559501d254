"""EL2N and GraNd early in training, averaged over initializations ("Deep Learning on a
Data Diet", Paul et al. 2021).

``n_inits`` models (different initializations and batch orders) are trained for a few
``epochs`` on the full data (all at once with ``torch.func`` when possible), and each
example's EL2N (``||softmax - onehot||``) and GraNd (per-example gradient norm) are
averaged over them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from typing import Any, Callable

from torch import nn

from ..data import Dataset
from ..ensemble import ModelFn, as_model_fn, mlp_factory, predict_members, train_members, training_arrays
from ..errors import DataError
from .basic import el2n, grand
from .registry import ScoreSettings, register_score


def data_diet_scores(
    data: Any,
    model_fn: ModelFn | Callable[[], nn.Module],
    *,
    n_inits: int = 4,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    seed: int = 0,
    scores: tuple[str, ...] = ("el2n", "grand"),
    vectorize: bool | None = None,
    backend=None,
) -> pd.DataFrame:
    """Data Diet scores.

    Args:
        data: training set (``N`` examples): a :class:`gradsift.data.Dataset`, or a torch
            ``Dataset`` of ``(inputs, target)`` items (ids = positions) or a ``DataLoader``
            over one, read in batches (:func:`gradsift.ensemble.training_arrays`).
        model_fn: the model for initialization ``k``: ``k -> nn.Module``, or a factory of
            fresh models ``() -> nn.Module`` (called under the member's seed, derived from
            ``seed``; :func:`gradsift.ensemble.as_model_fn`).
        n_inits: number of initializations averaged.
        epochs: training epochs before scoring ("early in training"; 0 scores at init).
        scores: which of ``el2n``, ``grand`` to compute (GraNd needs per-example gradients).
        backend: where to train the models (:mod:`gradsift.backends`).

    Returns:
        DataFrame indexed by ``example_id`` with the requested columns (means over inits).
    """
    unknown = set(scores) - {"el2n", "grand"}
    if unknown:
        raise DataError(f"unknown Data Diet score(s): {sorted(unknown)}; use el2n and/or grand")
    x, y, example_ids = training_arrays(data)
    model_fn = as_model_fn(model_fn, seed)
    if epochs > 0:
        masks = torch.ones(n_inits, len(y), dtype=torch.bool)
        models = train_members(model_fn, x, y, masks, epochs=epochs, batch_size=batch_size, lr=lr,
                               momentum=momentum, seed=seed, vectorize=vectorize, backend=backend)
    else:
        models = [model_fn(k).eval() for k in range(n_inits)]
    cols: dict[str, np.ndarray] = {}
    if "el2n" in scores:
        cols["el2n"] = torch.stack([el2n(o, y) for o in predict_members(models, x)]).mean(0).numpy()
    if "grand" in scores:
        if isinstance(x, torch.Tensor):
            cols["grand"] = torch.stack([grand(m, x, y) for m in models]).mean(0).numpy()
        else:  # streamed: one chunk of fetched inputs at a time
            pos = torch.arange(len(y))
            cols["grand"] = torch.stack([torch.cat([grand(m, x[c], y[c]) for c in pos.split(256)])
                                         for m in models]).mean(0).numpy()
    return pd.DataFrame(cols, index=pd.Index(example_ids, name="example_id"))


def data_diet(data: Dataset, settings: ScoreSettings, wanted: tuple[str, ...], backend=None) -> pd.DataFrame:
    """The registry's function for ``el2n`` and ``grand``: :func:`data_diet_scores` with
    ``settings`` (``diet_inits`` MLPs trained ``diet_epochs`` epochs)."""
    mf = mlp_factory(data, width=settings.width, seed=settings.seed + 1000)
    return data_diet_scores(data, mf, n_inits=settings.diet_inits, epochs=settings.diet_epochs, seed=settings.seed,
                            scores=wanted, backend=backend, batch_size=settings.batch_size, lr=settings.lr,
                            momentum=settings.momentum)


register_score("el2n", kind="function", make=data_diet,
               description="||softmax - onehot|| early in training, mean over inits (Data Diet)")
register_score("grand", kind="function", make=data_diet,
               description="per-example gradient norm early in training, mean over inits (Data Diet)")
