"""Per-example data scores: every function returns one value per training example, keyed
by ``example_id``; recorders write them to the run directory during :func:`gradsift.fit`.

Every score registers itself in its own file (:mod:`gradsift.scores.registry`): its name,
whether it is a recorder or a function, its columns and its orientation.
``gs.scores.SCORES`` lists them; :func:`compute_scores` computes any of them by name; the
CLI, pruning curves and reports read the registry.

Scores (higher = harder / more atypical / more suspect, unless noted)

=====================  =====================================================  =========================
column                 what                                                   where
=====================  =====================================================  =========================
``loss``               loss at the last presentation                          :class:`DynamicsRecorder`
``margin``             ``p_y - max_{k!=y} p_k`` at the last presentation      :class:`DynamicsRecorder`
                       (low = suspect)
``aum``                area under the logit margin ``z_y - max_{k!=y} z_k``   :class:`AUMRecorder`
                       over training (Pleiss et al.; low = mislabeled)
``confidence``,        Data Map (Swayamdipta et al.): mean and std of         :class:`DynamicsRecorder`
``variability``,       ``p(y|x)`` over epochs, fraction of epochs correct
``correctness``        (:mod:`gradsift.datamap` draws the map)
``alignment``          cosine of ``g_i`` with the mean gradient of the rest   :class:`AlignmentRecorder`
                       of its batch, mean over steps (exact, from the ghost
                       Gram; low = pulls against the batch)
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

from ..ensemble import mlp_factory, predict_members, subset_masks, train_members
from .registry import (
    SCORES, Score, ScoreSettings, compute_scores, hardness, register_score, score_for_column, score_names,
)
from .basic import (
    color_filter_scores, el2n, grand, logits, losses, margin, penultimate_embeddings, prototype_distance,
)
from .alignment import AlignmentRecorder
from .aum import AUMRecorder, area_under_margin, logit_margin
from .datadiet import data_diet_scores
from .dynamics import (
    DynamicsRecorder, cumulative_loss, data_map, forgetting_events, forgetting_score, learning_time,
)
from .influence import TracInRecorder, tracin, tracin_checkpoint
from .memorization import memorization_estimate, memorization_scores
from .selection import color_filter, prototype_scores

__all__ = [
    "AlignmentRecorder", "area_under_margin", "AUMRecorder", "color_filter", "color_filter_scores", "compute_scores",
    "cumulative_loss", "data_diet_scores", "data_map", "DynamicsRecorder", "el2n", "forgetting_events",
    "forgetting_score", "grand", "hardness", "learning_time", "logit_margin", "logits", "losses",
    "margin", "memorization_estimate", "memorization_scores", "mlp_factory", "penultimate_embeddings",
    "predict_members", "prototype_distance", "prototype_scores", "register_score", "Score",
    "score_for_column", "score_names", "SCORES", "ScoreSettings", "subset_masks", "tracin",
    "tracin_checkpoint", "TracInRecorder", "train_members",
]
