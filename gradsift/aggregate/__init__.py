"""Aggregators: turn per-example gradients into one update direction.

Each aggregator is a tiny ``(init, update)`` pair in the spirit of optax::

    agg = gs.aggregate.chain(gs.aggregate.clip(1.0), gs.aggregate.mean())
    state = agg.init(params)
    update, state = agg.update(grads, state)   # grads: name -> [B, *shape]
    gs.aggregate.write_grads(model, update)    # then optimizer.step()

or, for a whole training step by the cheapest exact path (plain backward, layer by
layer, or materialized per-example gradients; optionally across ranks)::

    r = gs.aggregate.step_update(model, loss_fn, x, y, "clip:max_norm=1+mean", state)

Aggregators declare what they take and give: ``input``/``output`` is ``"per_example"``
(name -> ``[B, *shape]``) or ``"batch"`` (name -> ``param.shape``). The contract and
its optional layer-wise and sharded forms are in :mod:`gradsift.aggregate.base`; each
aggregator lives in its own file and registers its spec name there
(:data:`AGGREGATORS`, :func:`register_aggregator`, :func:`aggregator_from_spec`).

Side inputs: an aggregator that needs more than the gradients (Sven needs the
per-example losses, group masking the examples' positions) lists them in ``needs`` and
takes them as keyword arguments of ``update`` (each ``[B, ...]``); :func:`apply` passes
each one only what it declares::

    update, state = gs.aggregate.apply(agg, grads, state, losses=losses, positions=idx)

Non-finite values: every reducer raises :class:`~gradsift.errors.NonFiniteGradientError`
when a per-example gradient holds NaN or inf. Put :func:`drop_nonfinite` first in a
``chain`` to drop those examples instead. An empty batch (B = 0) gives a zero update.

Adding an aggregator is one new file: a factory returning an :class:`Aggregator`,
decorated with ``@register_aggregator("name")``, with its layer-wise form
(``weighted_sums``, ``per_coordinate`` or ``row_scale``) next to its math; import it
below.
"""

from . import masking, sven
from .base import (
    AGGREGATORS,
    SIDE_INPUTS,
    Aggregator,
    Grads,
    RowScale,
    Shard,
    State,
    WeightedSums,
    aggregator_from_spec,
    apply,
    chain,
    check_finite,
    clip_factors,
    finite_rows,
    flat_rows,
    group_slices,
    median3,
    register_aggregator,
    squared_norms,
    write_grads,
)
from .clip import clip, clip_scales
from .dp import dp_sgd, gaussian_noise, normalized_sum, require_all_parameters
from .gaf import gaf
from .layerwise import Aggregated, StepUpdate, aggregated_gradient, step_update
from .m3 import m3, m3_mean
from .masking import group_masking
from .mean import mean, mean_of
from .median import coordinate_median, median_of
from .nonfinite import drop_nonfinite
from .rm3 import rm3
from .sharded import GlobalAggregation
from .sven import sven_direction
from .trimmed_mean import trimmed_mean, trimmed_mean_of
from .winsorize import batch_extremes, winsorize, winsorized_mean

#: Per-example -> batch reducers by spec name (a view of :data:`AGGREGATORS`).
REDUCERS = {"mean": mean, "winsorize": winsorize, "m3": m3, "trimmed_mean": trimmed_mean,
            "coordinate_median": coordinate_median, "median": coordinate_median}

__all__ = [
    "Aggregator", "RowScale", "WeightedSums", "Shard", "Grads", "State", "SIDE_INPUTS",
    "AGGREGATORS", "register_aggregator", "aggregator_from_spec",
    "mean", "winsorize", "m3", "rm3", "trimmed_mean", "coordinate_median", "clip",
    "drop_nonfinite", "gaf", "normalized_sum", "gaussian_noise", "require_all_parameters",
    "dp_sgd", "group_masking", "sven_direction",
    "chain", "apply", "write_grads", "mean_of", "winsorized_mean", "m3_mean",
    "trimmed_mean_of", "median_of", "median3", "clip_factors", "clip_scales", "flat_rows",
    "finite_rows", "check_finite", "squared_norms", "group_slices", "batch_extremes",
    "REDUCERS", "step_update", "StepUpdate", "aggregated_gradient", "Aggregated",
    "GlobalAggregation", "masking", "sven",
]
