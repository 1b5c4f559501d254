"""Per-example data scores: every function returns one value per training example, keyed
by ``example_id``; recorders write them to the run directory during :func:`gradsift.fit`.

Scores (higher = harder / more atypical / more suspect, unless noted)

=====================  =====================================================  =========================
column                 what                                                   where
=====================  =====================================================  =========================
``loss``               loss at the last presentation                          :class:`DynamicsRecorder`
``margin``             ``p_y - max_{k!=y} p_k`` at the last presentation      :class:`DynamicsRecorder`
                       (low = suspect)
``cum_loss``           sum of the loss over all presentations                 :class:`DynamicsRecorder`
``forgetting_events``  correct -> wrong transitions (Toneva et al.)           :class:`DynamicsRecorder`
``forgetting``         events; ``T`` (epochs) if never learned                :class:`DynamicsRecorder`
``learning_time``      first epoch from which it stays correct (``T+1``:      :class:`DynamicsRecorder`
                       not learned)
``self_influence``     TracIn: ``sum_t lr_t ||g_t(z_i)||^2``                  :class:`TracInRecorder`
``test_influence``     TracIn: ``sum_t lr_t g_t(z_i).g_t(z'_j)`` summed over  :class:`TracInRecorder`
                       the chosen test examples (high = helpful)
``el2n``, ``grand``    Data Diet, early in training, mean over inits          :func:`data_diet_scores`
``mem``, ``mem_se``    Feldman-Zhang memorization and its standard error      :func:`memorization_scores`
``color_filter``       prior loss - conditioned loss (high = useful for the   :func:`color_filter`
                       target set)
``prototype_distance`` distance to the nearest k-means centroid of its class  :func:`prototype_scores`
                       in penultimate-layer space
=====================  =====================================================  =========================

Files in a run directory (all Parquet, written atomically; see :mod:`gradsift.rundir`)

* ``scores.parquet``: one row per training example, ``example_id`` (int64) plus any of the
  columns above and ``label`` (the training label). Writers merge their columns in
  (:meth:`gradsift.rundir.RunDir.write_scores`); ``gradsift.open_run(RUN).scores()``
  returns it indexed by ``example_id``.
* ``dynamics/part-<epoch>.parquet``: ``example_id, epoch, loss, correct, margin``, one row
  per presentation of an example in a mini-batch (before the step), one part per epoch.
* ``influence.parquet``: ``example_id, test_id, influence`` (TracIn, train x chosen test).
* ``metrics.parquet`` (from :func:`gradsift.fit`): one row per epoch.

All functions are pure (model or model factory + data -> DataFrame indexed by
``example_id``), so they can run on a shard of the data and be concatenated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data import Dataset
from ..models import mlp
from .basic import (
    color_filter_scores, el2n, grand, logits, losses, margin, penultimate_embeddings,
    prototype_distance,
)
from .datadiet import data_diet_scores
from .dynamics import (
    DynamicsRecorder, cumulative_loss, forgetting_events, forgetting_score, learning_time,
)
from .influence import TracInRecorder, tracin, tracin_checkpoint
from .members import predict_members, train_members
from .memorization import memorization_estimate, memorization_scores, subset_masks
from .selection import color_filter, prototype_scores


def mlp_factory(data: Dataset, *, width: int = 128, depth: int = 2, seed: int = 0) -> Callable[[int], nn.Module]:
    """``k -> mlp`` for ``data`` (input size and classes from the data), member ``k``
    initialized with seed ``seed + k``."""
    in_features = int(data.x[0].size)

    def make(k: int) -> nn.Module:
        torch.manual_seed(seed * 7919 + k)
        return mlp(in_features, data.num_classes, width=width, depth=depth)

    return make


__all__ = [
    "color_filter", "color_filter_scores", "cumulative_loss", "data_diet_scores", "DynamicsRecorder",
    "el2n", "forgetting_events", "forgetting_score", "grand", "learning_time", "logits", "losses",
    "margin", "memorization_estimate", "memorization_scores", "mlp_factory", "penultimate_embeddings",
    "predict_members", "prototype_distance", "prototype_scores", "subset_masks", "tracin",
    "tracin_checkpoint", "TracInRecorder", "train_members",
]
