"""One aggregation step: :func:`step_update` (and the layer-wise runner behind it).

A step turns a batch into an update through an aggregator, by the cheapest of three
paths, each asked of the aggregator (never of its name):

* **plain backward**: the aggregator takes batch gradients (``rm3``), or its reducer is
  the uniform weighted sum (``mean``, with only batch stages after it), and nothing needs
  per-example gradients: one ordinary backward pass of the mean loss;
* **layer-wise**: the aggregator is ``[row-scale stages] > reducer > [batch stages]``
  where every row-scale stage has a :class:`~gradsift.aggregate.base.RowScale` form
  (``clip``, ``drop_nonfinite``, ``group_masking``, ``require_all_parameters``) and the
  reducer has a ``weighted_sums`` form (``mean``, ``normalized_sum``, ``m3``, ``gaf``) or
  is ``per_coordinate`` (``winsorize``, ``trimmed_mean``, ``coordinate_median``), on a
  hookable model. One forward and one backward pass record each layer's activations and
  output gradients; the row factors come from ghost norms; a weighted-sums reducer never
  forms per-example gradients (book-keeping: ``clip > mean`` costs about one backward),
  a per-coordinate one forms them a cache-sized block of one layer at a time;
* **materialized**: per-example gradients of the whole model
  (:func:`gradsift.engine.per_example`), then the aggregator's local form.

With ``comm`` (a :class:`~gradsift.distributed.comm.Comm`) every path is exact across
ranks: the layer-wise path all-reduces the weighted sums, the others run
:class:`~gradsift.aggregate.sharded.GlobalAggregation`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import layers
from ..errors import NonFiniteGradientError
from ..inputs import Inputs, batch_size
from ..engine import (LossFn, Method, batch_gradient, check_per_example_safe, per_example,
                      resolve_method, trainable_parameters)
from .base import (Aggregator, Comm, Grads, Shard, State, aggregator_from_spec, apply,
                   owned, row_view, unshared)
from .sharded import GlobalAggregation, Mode


# ---------------------------------------------------------------- the layer-wise plan

@dataclass(frozen=True)
class LayerwisePlan:
    """How to run an aggregator layer by layer.

    Attributes:
        scales: ``(index in the chain, stage)`` of the row-scale stages, in order.
        reducer: the reducing stage and its index.
        tail: ``(index, stage)`` of the batch -> batch stages after it.
        chained: the aggregator is a chain (its state is a tuple).
    """

    scales: tuple[tuple[int, Aggregator], ...]
    reducer: tuple[int, Aggregator]
    tail: tuple[tuple[int, Aggregator], ...]
    chained: bool

    @property
    def needs_norms(self) -> bool:
        return any(s.row_scale.needs_norms for _, s in self.scales)  # type: ignore[union-attr]


def plan(aggregator: Aggregator) -> LayerwisePlan | None:
    """A :class:`LayerwisePlan` for ``aggregator``, or ``None`` when it has no layer-wise
    form (see the module doc)."""
    stages = aggregator.stages
    i, scales = 0, []
    while i < len(stages) and stages[i].output == "per_example":
        if stages[i].row_scale is None:
            return None
        scales.append((i, stages[i]))
        i += 1
    if i >= len(stages):
        return None
    red = stages[i]
    if red.input != "per_example" or red.needs or (red.weighted_sums is None and red.per_coordinate is None):
        return None
    tail = []
    for j in range(i + 1, len(stages)):
        if stages[j].input != "batch" or stages[j].parts or stages[j].needs:
            return None
        tail.append((j, stages[j]))
    return LayerwisePlan(tuple(scales), (i, red), tuple(tail), bool(aggregator.parts))


def _row_factors(p: LayerwisePlan, model: nn.Module, rec: layers.Recording,
                 side: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """Product of the row-scale stages' factors, name -> ``[B]`` (absent: 1), or ``None``
    when the batch must be materialized (non-finite norms, a stage that declines)."""
    if not p.scales:
        return {}
    b = rec.losses.shape[0]
    if p.needs_norms:
        norms = layers.recording_norms_sq(model, rec)
        if not _all_finite(norms.values()):
            return None
    else:
        norms = {n: rec.losses.new_zeros(b) for n in trainable_parameters(model)}
    factors: dict[str, Tensor] = {}
    last = len(p.scales) - 1
    for i, (_, stage) in enumerate(p.scales):
        f = stage.row_scale.factors(norms, **{k: side[k] for k in stage.needs})  # type: ignore[union-attr]
        if f is None:
            return None
        if isinstance(f, Tensor):
            f = {n: f for n in norms}
        for n, v in f.items():
            v = v.to(rec.losses.device, rec.losses.dtype)
            factors[n] = factors[n] * v if n in factors else v
            if i < last:  # the norms as the next stage receives them
                norms[n] = norms[n] * v.square()
    return factors


def layerwise_update(model: nn.Module, rec: layers.Recording, p: LayerwisePlan,
                     side: dict[str, Tensor] | None = None, shard: Shard | None = None,
                     *, release: bool = False) -> Grads | None:
    """The reduced update (name -> ``param.shape``) from a recording, layer by layer.

    Args:
        side: side inputs for the row-scale stages (``positions`` for masking), ``[B]`` each.
        shard: this rank's place in a global batch: the weighted sums are all-reduced
            (only weighted-sums reducers).
        release: empty each layer's capture once its sums are taken (``rec`` is not used
            again): the peak then holds one layer's update and the captures still to go,
            not every capture and the whole update.

    Returns:
        ``None`` when the batch must take the materialized path instead (some per-example
        gradient is not finite, or a stage declines); the caller then runs it, which
        drops or reports those examples. With ``shard`` every rank returns ``None`` alike.
    """
    side = side or {}
    b = rec.losses.shape[0]
    factors = _row_factors(p, model, rec, side)
    if shard is not None and not _agree(shard, factors is not None):
        return None
    if factors is None:
        return None
    names = layers.parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    red = p.reducer[1]
    if red.weighted_sums is not None:
        update = _weighted(model, rec, names, factors, red, b, shard, norms_checked=p.needs_norms, release=release)
    else:
        update = _per_coordinate(model, rec, names, factors, red)
    if shard is not None and not _agree(shard, update is not None):
        return None
    return update


def _agree(shard: Shard, ok: bool) -> bool:
    """True on every rank when ``ok`` on every rank."""
    return int(shard.comm.all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))[0]) == 0


def _own(names: dict[tuple[str, str], str], lname: str) -> dict[str, str]:
    return {local: n for (l, local), n in names.items() if l == lname}


def _weighted(model, rec, names, factors, red: Aggregator, b: int, shard: Shard | None,
              norms_checked: bool = False, release: bool = False) -> Grads | None:
    """The weighted sums, combined. ``norms_checked``: every per-example norm was seen to be
    finite, so every per-example gradient is, and so are sums of them with finite weights
    (a squared norm overflows long before such a sum): the final check is skipped."""
    form = red.weighted_sums
    dtype, device = rec.losses.dtype, rec.losses.device
    if shard is None:
        W = form.weights(b, dtype, device)
    else:
        W = form.weights(shard.total, dtype, device)[:, shard.offset : shard.offset + b]
    k = W.shape[0]
    spans = [_span(W[j]) for j in range(k)] if k > 1 else [None]
    sums: dict[str, list[Tensor]] = {}

    def add(name: str, j: int, value: Tensor) -> None:
        parts = sums.setdefault(name, [None] * k)  # type: ignore[list-item]
        parts[j] = value if parts[j] is None else parts[j] + value

    # Last layer first: the first layers' captures are the ones a plain backward frees
    # last, and an embedding's dense update is then taken when little else is held.
    for lname, cap in reversed(rec.captures.items()):
        own = _own(names, lname)
        fs = {local: factors.get(n) for local, n in own.items()}
        same = len({id(f) for f in fs.values()}) == 1
        sliceable = k > 1 and _sliceable(cap, b)
        for j in range(k):
            # a row that weighs one contiguous run of examples (m3's groups, gaf's
            # micro-batches) only needs that run: k sums cost about one
            lo, hi = spans[j] if sliceable and spans[j] is not None else (0, b)
            if hi <= lo:
                continue
            part = cap if (lo, hi) == (0, b) else _slice_capture(cap, lo, hi)
            wj = W[j, lo:hi]
            if same:
                f = next(iter(fs.values()))
                w = wj if f is None else wj * f[lo:hi]
                for local, g in layers.layer_weighted_sum(part, w).items():
                    add(own[local], j, g)
            else:
                for local, name in own.items():
                    f = fs[local]
                    w = wj if f is None else wj * f[lo:hi]
                    add(name, j, layers.layer_weighted_sum(part, w)[local])
        if release:
            _release(cap)
    stacked: Grads = {}
    for n, par in trainable_parameters(model).items():
        parts = sums.get(n)
        if parts is None:
            stacked[n] = par.new_zeros((k, *par.shape))
        elif k == 1 and parts[0] is not None:
            stacked[n] = parts[0].unsqueeze(0)
        else:
            stacked[n] = torch.stack([x if x is not None else par.new_zeros(par.shape) for x in parts])
    if shard is not None:
        stacked = shard.all_reduce(stacked)
    if not norms_checked and not _all_finite(stacked.values()):
        return None
    return form.combine(stacked)


def _release(cap: layers.Capture) -> None:
    """Drop a capture's tensors (its layer's sums are taken)."""
    for field_name in ("inputs", "grad_outputs", "args", "kwargs", "extra_grads", "replays"):
        getattr(cap, field_name).clear()


def _all_finite(tensors) -> bool:
    """Every value finite (a sum is non-finite when any term is: one pass, no bool mask;
    a finite sum that overflows only sends the batch to the materialized path). One
    host sync when the tensors share a device and dtype."""
    tensors = list(tensors)
    if not tensors:
        return True
    if sum(t.numel() for t in tensors) <= 1 << 16 and len({(t.device, t.dtype) for t in tensors}) == 1:
        return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors]).sum()))  # few small ones
    sums = [t.sum() for t in tensors]
    if all(s.device == sums[0].device and s.dtype == sums[0].dtype for s in sums):
        return bool(torch.isfinite(torch.stack(sums).sum()))
    return all(bool(torch.isfinite(s)) for s in sums)


def _span(w: Tensor) -> tuple[int, int] | None:
    """``(lo, hi)`` when the nonzero weights of ``w [B]`` are exactly ``lo..hi-1``."""
    nz = torch.nonzero(w).flatten()
    if nz.numel() == 0:
        return (0, 0)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return (lo, hi) if hi - lo == nz.numel() else None


def _sliceable(cap: layers.Capture, b: int) -> bool:
    """The capture holds only batch-first inputs and output gradients (no extra call
    arguments or outputs), so a run of examples is a slice of each; otherwise the full
    weights are used (same result, k times the work)."""
    extra = (*getattr(cap, "extra_grads", ()), *getattr(cap, "extra_outputs", ()))
    return (not any(cap.kwargs) and all(len(a) <= 1 for a in cap.args) and not any(extra)
            and all(t.shape[:1] == (b,) for t in (*cap.inputs, *cap.grad_outputs)))


def _slice_capture(cap: layers.Capture, lo: int, hi: int) -> layers.Capture:
    """The capture of examples ``lo..hi-1`` only."""
    return layers.Capture(
        cap.module, inputs=[a[lo:hi] for a in cap.inputs],
        grad_outputs=[d[lo:hi] for d in cap.grad_outputs],
        args=[tuple(x[lo:hi] if isinstance(x, Tensor) else x for x in a) for a in cap.args],
        kwargs=[dict(kw) for kw in cap.kwargs],
    )


def _per_coordinate(model, rec, names, factors, red: Aggregator) -> Grads | None:
    fn = red.per_coordinate
    shared = {n for n, c in Counter(names.values()).items() if c > 1}
    update: Grads = {}
    pending: Grads = {}  # per-example grads of shared parameters, reduced at the end

    def reduce_one(name: str, g: Tensor) -> Tensor | None:
        f = factors.get(name)
        if f is not None:
            g = g * row_view(f, g)
        if not bool(torch.isfinite(g.sum())):
            return None
        return fn(g)

    for lname, cap in rec.captures.items():
        own = _own(names, lname)
        if set(own.values()) & shared:
            for local, g in layers.layer_grads(cap).items():
                name = own[local]
                if name in shared:
                    pending[name] = pending[name] + g if name in pending else g
                else:
                    part = reduce_one(name, g)
                    if part is None:
                        return None
                    update[name] = part
            continue
        reduced = layers.layer_reduced(cap, fn, lambda local, own=own: factors.get(own[local]))
        if reduced is None:
            return None
        for local, value in reduced.items():
            update[own[local]] = value
    for name, g in pending.items():
        part = reduce_one(name, g)
        if part is None:
            return None
        update[name] = part
    for name, par in trainable_parameters(model).items():
        if name not in update:
            update[name] = torch.zeros_like(par)
    return update


def run_tail(p: LayerwisePlan, update: Grads, state: State) -> tuple[Grads, State]:
    """Apply the batch stages after the reducer; return the new full state."""
    if not p.chained:
        return update, state
    new_state = list(state)
    for j, agg in p.tail:
        # the update is this step's own (fresh sums): a stage that can, changes it in place
        if agg.update_in_place is not None and owned(update, new_state):
            new_state[j] = agg.update_in_place(update, new_state[j])
        else:
            update, new_state[j] = agg.update(update, new_state[j])
    return update, tuple(new_state)


# ---------------------------------------------------------------- one step

class StepUpdate(NamedTuple):
    """What :func:`step_update` returns.

    Attributes:
        update: name -> ``param.shape`` (write it with :func:`~gradsift.aggregate.write_grads`).
        state: the aggregator's new state.
        losses: ``[b]`` per-example losses of this process's examples (detached).
        outputs: ``[b, ...]`` model outputs (detached).
        grads: name -> ``[b, *shape]`` per-example gradients when they were formed for the
            whole model (always with ``keep_grads=True``), else ``None``.
        path: ``"plain"``, ``"layerwise"`` or ``"materialized"``.
    """

    update: Grads
    state: State
    losses: Tensor
    outputs: Tensor
    grads: Grads | None
    path: str


def _resolve(aggregator: Aggregator | str) -> Aggregator:
    if isinstance(aggregator, str):
        aggregator = aggregator_from_spec(aggregator)
    if not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator must be an Aggregator or a spec string, got {type(aggregator)}")
    if aggregator.output != "batch":
        raise ValueError(
            f"aggregator {aggregator.name} gives per-example gradients; chain a reducer such as "
            "gs.aggregate.mean() after it"
        )
    return aggregator


def _never_sharing_state(fn):
    """Wrap a step function so its update never shares memory with its state (see
    :func:`~gradsift.aggregate.base.unshared`): :func:`write_grads` may then hand the
    update to ``.grad`` without a copy."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> StepUpdate:
        r = fn(*args, **kwargs)
        return r._replace(update=unshared(r.update, r.state))

    return wrapper


@_never_sharing_state
def step_update(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    aggregator: Aggregator | str,
    state: State = None,
    *,
    keep_grads: bool = False,
    comm: Comm | None = None,
    chunk_size: int | None = None,
    method: Method = "auto",
    layerwise: bool = True,
    mode: Mode = "exact",
    **side_inputs: Tensor,
) -> StepUpdate:
    """One step's update through ``aggregator``, by the cheapest exact path.

    Args:
        model, loss_fn: as for :func:`gradsift.engine.per_example`.
        inputs: this process's examples: a tensor ``[b, ...]``, or a tuple/dict of them
            (see :mod:`gradsift.inputs`); targets: ``[b, ...]``.
        aggregator: an :class:`~gradsift.aggregate.Aggregator` or a spec string.
        state: its state (``None``: ``aggregator.init``).
        keep_grads: form and return the per-example gradients (a recorder needs them).
        comm: make the update exact over the ranks of this process group (each rank
            passes its contiguous shard of the global batch, in rank order).
        chunk_size: for the materialized path, as in :func:`~gradsift.engine.per_example`.
        method: ``"auto"``, ``"hooks"`` or ``"vmap"`` (``"vmap"`` never runs layer-wise).
        layerwise: ``False`` forbids the layer-wise path (checks and benchmarks).
        mode: with ``comm``, ``"exact"`` (the one-process update on the global batch) or
            ``"local"``: each rank aggregates its own examples by this function, then the
            results are averaged weighted by their counts (one all-reduce of ``P``; not the
            one-process update). Batch-input aggregators are exact in either mode.
        **side_inputs: ``positions``, ``example_ids``, ... (``[b]`` each) for aggregators
            that declare them in ``needs``; ``losses``, ``outputs``, ``targets`` are supplied.

    Returns:
        :class:`StepUpdate` ``(update, state, losses, outputs, grads, path)``; the update
        never shares memory with the state.
    """
    aggregator = _resolve(aggregator)
    b = batch_size(inputs, targets)
    if comm is not None and mode == "local" and aggregator.input == "per_example":
        try:
            r, failed = step_update(model, loss_fn, inputs, targets, aggregator, state, keep_grads=keep_grads,
                                    chunk_size=chunk_size, method=method, layerwise=layerwise, **side_inputs), None
        except NonFiniteGradientError as e:  # every rank raises, none waits in the all-reduce
            r, failed = None, e
        if not _agree_comm(comm, failed is None):
            raise failed or NonFiniteGradientError(
                f"{aggregator.name}: per-example gradients on another rank hold NaN or inf; lower the "
                "learning rate or check the data (fit: on_nonfinite='drop' drops such examples)")
        return r._replace(update=GlobalAggregation(aggregator, comm, mode).global_mean(r.update, b))
    empty = targets.new_zeros((0,), dtype=torch.get_default_dtype())
    if state is None:
        state = aggregator.init({n: p.detach() for n, p in trainable_parameters(model).items()})
    ga = GlobalAggregation(aggregator, comm) if comm is not None else None

    if aggregator.input == "batch" and not keep_grads:
        grads, losses, outputs = batch_gradient(model, loss_fn, inputs, targets) if b else (
            {n: torch.zeros_like(p) for n, p in trainable_parameters(model).items()},
            empty, empty)
        extras = {"losses": losses, "outputs": outputs, "targets": targets, **side_inputs}
        if ga is not None:
            update, state = ga.update_batch(grads, b, state, **extras)
        else:
            update, state = apply(aggregator, grads, state, **extras)
        return StepUpdate(update, state, losses, outputs, None, "plain")

    check_per_example_safe(model)
    p = plan(aggregator) if (layerwise and not keep_grads) else None
    if p is not None and not p.scales and p.reducer[1].weighted_sums is not None \
            and p.reducer[1].weighted_sums.uniform and (b > 0 or ga is not None):
        # the mean of per-example gradients is the gradient of the mean loss
        if b > 0:
            grads, losses, outputs = batch_gradient(model, loss_fn, inputs, targets)
        else:  # a rank without examples still joins the collectives
            grads = {n: torch.zeros_like(v) for n, v in trainable_parameters(model).items()}
            losses = outputs = empty
        if ga is not None:
            grads = ga.global_mean(grads, b)
        finite = _all_finite(grads.values())
        if ga is not None:
            finite = _agree_comm(comm, finite)
        if finite:  # else materialize: the reducer names the examples (or drops them)
            update = p.reducer[1].weighted_sums.combine({n: g.unsqueeze(0) for n, g in grads.items()})
            update, state = run_tail(p, update, state)
            return StepUpdate(update, state, losses, outputs, None, "plain")
    if p is not None and (ga is not None and p.reducer[1].weighted_sums is None):
        p = None  # sharded per-coordinate reducers need every rank's rows: materialize
    if p is not None:
        rec = None
        if b > 0 and resolve_method(model, method) == "hooks":
            try:
                rec = layers.record(model, loss_fn, inputs, targets)
            except layers.NotHookable:
                if method == "hooks":
                    raise
        # under comm every rank takes the same path (a rank without examples materializes)
        if ga is not None and not _agree_comm(comm, rec is not None):
            rec = None
        if rec is not None:
            shard = ga.shard(b) if ga is not None else None
            update = layerwise_update(model, rec, p, dict(side_inputs), shard, release=True)
            if update is not None:
                update, state = run_tail(p, update, state)
                return StepUpdate(update, state, rec.losses, rec.outputs, None, "layerwise")

    pe = per_example(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
    extras = {"losses": pe.losses, "outputs": pe.outputs, "targets": targets, **side_inputs}
    if aggregator.input == "per_example":
        if ga is not None:
            update, state = ga.update(pe.grads, state, **extras)
        else:
            update, state = apply(aggregator, pe.grads, state, **extras)
    else:
        batch = {n: g.mean(0) if g.shape[0] else g.new_zeros(g.shape[1:]) for n, g in pe.grads.items()}
        if ga is not None:
            update, state = ga.update_batch(batch, b, state, **extras)
        else:
            update, state = apply(aggregator, batch, state, **extras)
    return StepUpdate(update, state, pe.losses, pe.outputs, pe.grads, "materialized")


def _agree_comm(comm: Comm, ok: bool) -> bool:
    return int(comm.all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))[0]) == 0


# ---------------------------------------------------------------- aggregated_gradient

@dataclass
class Aggregated:
    """Result of :func:`aggregated_gradient`.

    Attributes:
        update: name -> ``param.shape`` update direction.
        losses: ``[B]`` per-example losses (detached).
        outputs: ``[B, ...]`` model outputs (detached).
        state: the aggregator's new state.
        fused: whether the per-example gradients of the whole model were never formed
            (the layer-wise or, for ``mean``, the plain path ran).
    """

    update: Grads
    losses: Tensor
    outputs: Tensor
    state: Any
    fused: bool


def aggregated_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    aggregator: Aggregator | str,
    state: Any = None,
    *,
    method: Method = "auto",
    fuse: bool = True,
    chunk_size: int | None = None,
) -> Aggregated:
    """Aggregate per-example gradients into one update, layer by layer where possible.

    :func:`step_update` for per-example aggregators (a batch-input aggregator such as
    ``rm3`` gets the mean of materialized per-example gradients here); ``fuse=False``
    forces the materialized path. Both give the same update up to float rounding.

    Returns:
        :class:`Aggregated` ``(update, losses, outputs, state, fused)``.
    """
    aggregator = _resolve(aggregator)
    check_per_example_safe(model)
    r = step_update(model, loss_fn, inputs, targets, aggregator, state, method=method,
                    layerwise=fuse, chunk_size=chunk_size, keep_grads=aggregator.input == "batch")
    return Aggregated(r.update, r.losses, r.outputs, r.state, fused=r.path != "materialized")
