"""Scores that need a trained model as input: CoLoR-Filter and prototype distance, with
small helpers that train the models they need."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import Dataset
from ..ensemble import ModelFn, mlp_factory, train_members, train_model
from .basic import color_filter_scores, penultimate_embeddings, prototype_distance
from .registry import ScoreSettings, register_score


def color_filter(
    data: Dataset,
    target: Dataset,
    model_fn: ModelFn,
    *,
    prior_epochs: int = 5,
    target_epochs: int = 5,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
) -> pd.DataFrame:
    """CoLoR-Filter scores (Brandfonbrener et al.): a prior model is trained on ``data``,
    a copy of it is fine-tuned on the small ``target`` set (the conditioned model), and
    each example of ``data`` scores ``loss_prior - loss_conditioned``.

    Returns:
        DataFrame indexed by ``example_id`` with column ``color_filter`` (high = the target
        set made this example more likely: select it).
    """
    x, y = data.tensors()
    prior = train_members(model_fn, x, y, torch.ones(1, len(data), dtype=torch.bool),
                          epochs=prior_epochs, batch_size=batch_size, lr=lr, momentum=momentum, seed=seed)[0]
    conditioned = copy.deepcopy(prior)
    xt, yt = target.tensors()
    train_model(conditioned, xt, yt, epochs=target_epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                seed=seed + 1)
    score = color_filter_scores(prior, conditioned, x, y).numpy()
    return pd.DataFrame({"color_filter": score}, index=pd.Index(data.example_ids, name="example_id"))


def prototype_scores(data: Dataset, model: nn.Module, *, clusters_per_class: int = 1,
                     seed: int = 0) -> pd.DataFrame:
    """Distance of each example's penultimate embedding under ``model`` to the nearest
    k-means centroid of its class.

    Returns:
        DataFrame indexed by ``example_id`` with column ``prototype_distance``.
    """
    x, _ = data.tensors()
    emb = penultimate_embeddings(model, x)
    d = prototype_distance(emb, data.y, clusters_per_class=clusters_per_class, seed=seed)
    return pd.DataFrame({"prototype_distance": np.asarray(d)}, index=pd.Index(data.example_ids, name="example_id"))


def prototypes(data: Dataset, settings: ScoreSettings, wanted: tuple[str, ...], backend=None) -> pd.DataFrame:
    """The registry's function for ``prototype_distance``: one MLP trained ``epochs``
    epochs on ``data``, then :func:`prototype_scores` (one centroid per class)."""
    x, y = data.tensors()
    model = train_members(mlp_factory(data, width=settings.width, seed=settings.seed + 1000), x, y,
                          torch.ones(1, len(data), dtype=torch.bool), epochs=settings.epochs,
                          batch_size=settings.batch_size, lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, seed=settings.seed, backend=backend)[0]
    return prototype_scores(data, model, seed=settings.seed)


register_score("prototype_distance", kind="function", make=prototypes,
               description="distance to its class centroid in penultimate-layer space (Sorscher et al.)")
