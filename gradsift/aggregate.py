"""Aggregators: turn per-example gradients into one update direction.

Each aggregator is a tiny ``(init, update)`` pair in the spirit of optax::

    agg = gs.aggregate.chain(gs.aggregate.clip(1.0), gs.aggregate.mean())
    state = agg.init(params)
    update, state = agg.update(grads, state)   # grads: name -> [B, *shape]
    gs.aggregate.write_grads(model, update)    # then optimizer.step()

Aggregators declare what they take and give: ``input``/``output`` is ``"per_example"``
(name -> ``[B, *shape]``) or ``"batch"`` (name -> ``param.shape``). ``clip`` maps
per-example to per-example; ``mean``, ``winsorize``, ``m3``, ``trimmed_mean`` and
``coordinate_median`` reduce per-example to batch; ``rm3`` maps batch to batch and so
needs no per-example gradients at all.

The per-coordinate reductions are also exposed as pure tensor functions
(:func:`winsorized_mean`, :func:`m3_mean`, ...) over ``[B, ...] -> [...]`` so that a
layer-by-layer engine can apply them as soon as one layer's gradients are ready.

Side inputs: an aggregator that needs more than the gradients (Sven needs the
per-example losses, group masking the examples' positions) lists them in ``needs``,
e.g. ``("losses",)``, and takes them as keyword arguments of ``update``: each a tensor
whose first axis is the batch (``[B]``). Call aggregators through :func:`apply`, which
passes each one only what it declares::

    update, state = gs.aggregate.apply(agg, grads, state, losses=losses, positions=idx)

:func:`fit <gradsift.train.fit>` supplies ``losses``, ``outputs``, ``targets``,
``positions`` (in the training set) and ``example_ids``.

Non-finite values: every reducer raises :class:`~gradsift.errors.NonFiniteGradientError`
when a per-example gradient holds NaN or inf. Put :func:`drop_nonfinite` first in a
``chain`` to drop those examples instead. An empty batch (B = 0) gives a zero update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from .errors import NonFiniteGradientError

Grads = dict[str, Tensor]
State = Any
Kind = Literal["per_example", "batch"]

__all__ = [
    "Aggregator", "mean", "winsorize", "m3", "rm3", "trimmed_mean", "coordinate_median",
    "clip", "drop_nonfinite", "chain", "write_grads", "winsorized_mean", "m3_mean",
    "trimmed_mean_of", "median_of", "clip_factors", "REDUCERS", "apply", "SIDE_INPUTS",
]

#: Side inputs a training loop can give aggregators (see ``Aggregator.needs``).
SIDE_INPUTS = ("losses", "outputs", "targets", "positions", "example_ids")


@dataclass(frozen=True)
class Aggregator:
    """An ``(init, update)`` pair with the kinds of gradients it takes and gives.

    Attributes:
        name: short name, e.g. ``"winsorize(c=2)"``.
        init: ``params -> state``.
        update: ``(grads, state) -> (update, state)``.
        input: ``"per_example"`` or ``"batch"``.
        output: ``"per_example"`` or ``"batch"``.
        per_coordinate: the reduction acts on each coordinate independently (so it can be
            applied layer by layer); ``None`` when it is not such a reduction.
        kind: the factory's name (``"winsorize"``, ``"clip"``, ...), for code that treats
            known aggregators specially (e.g. the distributed reductions); ``""`` if none.
        options: the factory's arguments, e.g. ``{"c": 2}``.
        parts: the components of a :func:`chain` (its state is the tuple of theirs).
        example_wise: a per-example -> per-example map that transforms each example on its
            own (``clip``, ``drop_nonfinite``), so it can run on any shard of a batch.
        needs: names of per-example side inputs (from :data:`SIDE_INPUTS`) that
            ``update`` takes as keyword arguments, each ``[B, ...]``; empty for most.
    """

    name: str
    init: Callable[[Grads], State]
    update: Callable[[Grads, State], tuple[Grads, State]]
    input: Kind
    output: Kind
    per_coordinate: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)
    kind: str = ""
    options: dict = field(default_factory=dict, compare=False)
    parts: tuple["Aggregator", ...] = field(default=(), compare=False)
    example_wise: bool = False
    needs: tuple[str, ...] = ()

    @property
    def needs_per_example(self) -> bool:
        return self.input == "per_example"

    def __repr__(self) -> str:
        return f"Aggregator({self.name})"


# ---------------------------------------------------------------- pure reductions

def _empty_guard(x: Tensor) -> Tensor | None:
    return x.new_zeros(x.shape[1:]) if x.shape[0] == 0 else None


def mean_of(x: Tensor) -> Tensor:
    """Mean over the batch axis: ``[B, ...] -> [...]``."""
    empty = _empty_guard(x)
    return empty if empty is not None else x.mean(0)


def winsorized_mean(x: Tensor, c: int) -> Tensor:
    """Winsorized mean over the batch axis: ``[B, ...] -> [...]``.

    Per coordinate, the ``c`` smallest values are raised to the ``(c+1)``-th smallest and
    the ``c`` largest lowered to the ``(c+1)``-th largest, then the B values are averaged
    (Chatterjee, "Coherent Gradients", ICLR 2020). ``c = 0`` is the mean.

    When ``B < 2c + 1`` the bounds would cross; ``c`` is then lowered to ``(B - 1) // 2``,
    which is the coordinate median (the limit of winsorizing).

    Computed by selection, never by sorting the batch: the result is
    ``(sum - top_c - bottom_c + c * u + c * l) / B`` with ``u``/``l`` the ``(c+1)``-th
    largest/smallest values. For ``c <= 3`` these come from a pairwise tournament of
    element-wise max/min over cache-sized column blocks (:func:`batch_extremes`), which is
    several times faster than ``topk`` along the batch axis; larger ``c`` uses ``topk``.
    """
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    empty = _empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    c = min(c, (b - 1) // 2)
    if c == 0:
        return x.mean(0)
    flat = x.reshape(b, -1)
    if c > _TOURNAMENT_MAX_C:
        top = torch.topk(flat, c + 1, dim=0, largest=True, sorted=True).values
        bottom = torch.topk(flat, c + 1, dim=0, largest=False, sorted=True).values
        out = flat.sum(0) - top[:c].sum(0) - bottom[:c].sum(0) + c * (top[c] + bottom[c])
        return (out / b).view(x.shape[1:])
    out = flat.new_empty(flat.shape[1])
    block = max(1, _BLOCK_ELEMENTS // b)
    for start in range(0, flat.shape[1], block):
        part = flat[:, start : start + block]
        top, bottom = batch_extremes(part, c + 1)
        acc = part.sum(0)
        for t in top[:c]:
            acc -= t
        for t in bottom[:c]:
            acc -= t
        acc += c * (top[c] + bottom[c])
        out[start : start + block] = acc / b
    return out.view(x.shape[1:])


#: Largest ``c`` winsorized by the tournament (its cost grows like c^2); above, topk.
_TOURNAMENT_MAX_C = 3
#: Elements per column block of the tournament (about 4 MB of float32: cache-sized).
_BLOCK_ELEMENTS = 1 << 20


def _merge_sorted(a: list[Tensor], b: list[Tensor], k: int, largest: bool) -> list[Tensor]:
    """The k largest (or smallest) of two per-coordinate sorted lists, sorted.

    The j-th largest of the union is ``max_i min(a_i, b_{j-i})`` over the splits with
    ``a_0 = b_0 = +inf`` (the terms with ``a_0``/``b_0`` are just ``b_j``/``a_j``).
    """
    better, worse = (torch.maximum, torch.minimum) if largest else (torch.minimum, torch.maximum)
    out = []
    for j in range(1, min(k, len(a) + len(b)) + 1):
        best: Tensor | None = None
        for i in range(0, j + 1):
            if i > len(a) or j - i > len(b):
                continue
            if i == 0:
                term = b[j - 1]
            elif i == j:
                term = a[j - 1]
            else:
                term = worse(a[i - 1], b[j - i - 1])
            best = term if best is None else better(best, term)
        out.append(best)
    return out


def batch_extremes(x: Tensor, k: int) -> tuple[list[Tensor], list[Tensor]]:
    """Per-coordinate k largest (descending) and k smallest (ascending) over axis 0.

    A pairwise tournament: the two halves of the batch are merged element-wise with
    max/min (one op per output element at the first level, ``O(k^2)`` after), so the
    work is a few passes over ``x``, all on contiguous rows.

    Args:
        x: ``[B, N]`` with ``B >= k``.

    Returns:
        (``k`` tensors ``[N]``, largest first; ``k`` tensors ``[N]``, smallest first).
    """
    m = x.shape[0]
    if m < k:
        raise ValueError(f"need at least k={k} rows, got {m}")
    top: list[Tensor] = [x]
    bottom: list[Tensor] = [x]
    leftovers: list[tuple[list[Tensor], list[Tensor]]] = []
    first = True
    while m > 1:
        h = m // 2
        if m % 2:
            leftovers.append(([t[2 * h :] for t in top], [t[2 * h :] for t in bottom]))
        if first:
            hi = torch.maximum(x[:h], x[h : 2 * h])
            lo = torch.minimum(x[:h], x[h : 2 * h])
            top, bottom = [hi, lo][:k], [lo, hi][:k]
            first = False
        else:
            top = _merge_sorted([t[:h] for t in top], [t[h : 2 * h] for t in top], k, True)
            bottom = _merge_sorted([t[:h] for t in bottom], [t[h : 2 * h] for t in bottom], k, False)
        m = h
    for lt, lb in reversed(leftovers):
        top = _merge_sorted(top, lt, k, True)
        bottom = _merge_sorted(bottom, lb, k, False)
    return [t[0] for t in top], [t[0] for t in bottom]


def _group_slices(b: int, groups: int) -> list[slice]:
    """Contiguous groups with sizes as equal as possible (``numpy.array_split`` rule)."""
    base, extra = divmod(b, groups)
    out, start = [], 0
    for k in range(groups):
        size = base + (1 if k < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def m3_mean(x: Tensor) -> Tensor:
    """Median of the means of 3 groups, per coordinate: ``[B, ...] -> [...]``.

    The batch is split in order into 3 contiguous groups with sizes as equal as possible
    (``numpy.array_split``: the first ``B % 3`` groups get one extra example). With
    ``B < 3`` the result is the mean. (Zielinski et al., "Weak and Strong Gradient
    Directions".)
    """
    empty = _empty_guard(x)
    if empty is not None:
        return empty
    if x.shape[0] < 3:
        return x.mean(0)
    means = torch.stack([x[s].mean(0) for s in _group_slices(x.shape[0], 3)])
    return median3(means[0], means[1], means[2])


def median3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Element-wise median of three tensors of the same shape."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def trimmed_mean_of(x: Tensor, fraction: float) -> Tensor:
    """Trimmed mean over the batch axis: ``[B, ...] -> [...]``.

    Per coordinate, ``k = floor(fraction * B)`` values are dropped at each end and the
    rest averaged; ``k`` is capped at ``(B - 1) // 2`` so at least one value remains.
    """
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"fraction must be in [0, 0.5), got {fraction}")
    empty = _empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    k = min(int(math.floor(fraction * b)), (b - 1) // 2)
    if k == 0:
        return x.mean(0)
    s = torch.sort(x, dim=0).values
    return s[k : b - k].mean(0)


def median_of(x: Tensor) -> Tensor:
    """Coordinate-wise median ``[B, ...] -> [...]``; for even B the mean of the two middle
    values (as ``numpy.median``)."""
    empty = _empty_guard(x)
    if empty is not None:
        return empty
    b = x.shape[0]
    if b % 2 == 1:
        return torch.kthvalue(x, b // 2 + 1, dim=0).values
    lo = torch.kthvalue(x, b // 2, dim=0).values
    hi = torch.kthvalue(x, b // 2 + 1, dim=0).values
    return (lo + hi) / 2


def clip_factors(norms: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Per-example scale ``min(1, max_norm / (norm + eps))``: ``[B] -> [B]``."""
    return (max_norm / (norms + eps)).clamp(max=1.0)


def flat_rows(g: Tensor) -> Tensor:
    """``[B, *shape] -> [B, prod(shape)]`` (scalar parameters too: ``[B] -> [B, 1]``)."""
    return g.flatten(1) if g.ndim > 1 else g.unsqueeze(1)


def _total_norms(grads: Grads) -> Tensor:
    sq = [flat_rows(g).square().sum(1) for g in grads.values()]
    return torch.stack(sq).sum(0).sqrt()


def finite_rows(grads: Grads) -> Tensor | None:
    """``[B]`` bool: the example's gradient is finite in every layer (``None`` if no layers)."""
    ok: Tensor | None = None
    for g in grads.values():
        row_ok = torch.isfinite(flat_rows(g)).all(1)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def _check_finite(grads: Grads, who: str) -> None:
    ok = finite_rows(grads)
    bad = None if ok is None else ~ok
    if bad is not None and bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(map(str, idx[:10])) + (" ..." if len(idx) > 10 else "")
        raise NonFiniteGradientError(
            f"{who}: per-example gradients of {len(idx)} example(s) hold NaN or inf "
            f"(batch positions {shown}). Lower the learning rate or check the data; to drop "
            "such examples instead, chain gs.aggregate.drop_nonfinite() first (CLI/fit: "
            "on_nonfinite='drop')."
        )


# ---------------------------------------------------------------- aggregators

def _reducer(name: str, fn: Callable[[Tensor], Tensor], kind: str, **options: Any) -> Aggregator:
    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        _check_finite(grads, name)
        return {n: fn(g) for n, g in grads.items()}, state

    return Aggregator(name, lambda params: (), update, "per_example", "batch", per_coordinate=fn,
                      kind=kind, options=options)


def mean() -> Aggregator:
    """Plain mean of per-example gradients (ordinary SGD direction)."""
    return _reducer("mean", mean_of, "mean")


def winsorize(c: int = 1) -> Aggregator:
    """Coordinate-wise winsorized mean; see :func:`winsorized_mean`."""
    c = int(c)
    if c < 0:
        raise ValueError(f"winsorize: c must be >= 0, got {c}")
    return _reducer(f"winsorize(c={c})", lambda x: winsorized_mean(x, c), "winsorize", c=c)


def m3() -> Aggregator:
    """Coordinate-wise median of the means of 3 groups; see :func:`m3_mean`."""
    return _reducer("m3", m3_mean, "m3")


def trimmed_mean(fraction: float = 0.1) -> Aggregator:
    """Coordinate-wise trimmed mean; see :func:`trimmed_mean_of`."""
    fraction = float(fraction)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trimmed_mean: fraction must be in [0, 0.5), got {fraction}")
    return _reducer(f"trimmed_mean(fraction={fraction:g})", lambda x: trimmed_mean_of(x, fraction),
                    "trimmed_mean", fraction=fraction)


def coordinate_median() -> Aggregator:
    """Coordinate-wise median; see :func:`median_of`."""
    return _reducer("coordinate_median", median_of, "coordinate_median")


def rm3() -> Aggregator:
    """Coordinate-wise median over the batch gradients of this step and the two previous.

    Takes *batch* gradients (name -> ``param.shape``), so it needs no per-example
    gradients. Until two previous steps exist, the current gradient is returned.
    """

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        history: tuple[Grads, ...] = state
        for n, g in grads.items():
            if not torch.isfinite(g).all():
                raise NonFiniteGradientError(f"rm3: the batch gradient of '{n}' holds NaN or inf")
        current = {n: g.detach().clone() for n, g in grads.items()}
        if len(history) < 2:
            out = {n: g.clone() for n, g in current.items()}
        else:
            p1, p2 = history
            out = {n: median3(current[n], p1[n], p2[n]) for n in current}
        return out, (current, *history[:1])

    return Aggregator("rm3", lambda params: (), update, "batch", "batch", kind="rm3")


def clip(max_norm: float = 1.0, *, per_layer: bool = False) -> Aggregator:
    """Per-example L2 clipping: ``g_i * min(1, C / (||g_i|| + 1e-6))``.

    Args:
        max_norm: C, the bound on each example's total gradient norm.
        per_layer: clip each layer separately to ``C / sqrt(L)`` (L = number of layers),
            which also bounds the total norm by C.
    """
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"clip: max_norm must be > 0, got {max_norm}")

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        _check_finite(grads, "clip")
        if not grads:
            return grads, state
        if per_layer:
            bound = max_norm / math.sqrt(len(grads))
            out = {}
            for n, g in grads.items():
                f = clip_factors(flat_rows(g).norm(dim=1), bound)
                out[n] = g * f.view(-1, *([1] * (g.ndim - 1)))
            return out, state
        f = clip_factors(_total_norms(grads), max_norm)
        return {n: g * f.view(-1, *([1] * (g.ndim - 1))) for n, g in grads.items()}, state

    name = f"clip(max_norm={max_norm:g}{', per_layer' if per_layer else ''})"
    return Aggregator(name, lambda params: (), update, "per_example", "per_example", kind="clip",
                      options={"max_norm": max_norm, "per_layer": per_layer}, example_wise=True)


def drop_nonfinite() -> Aggregator:
    """Drop examples whose per-example gradient holds NaN or inf.

    State: the total number of examples dropped so far (an ``int``).
    """

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        keep = finite_rows(grads)
        if keep is None or bool(keep.all()):
            return grads, state
        return {n: g[keep] for n, g in grads.items()}, state + int((~keep).sum())

    return Aggregator("drop_nonfinite", lambda params: 0, update, "per_example", "per_example",
                      kind="drop_nonfinite", example_wise=True)


def chain(*aggregators: Aggregator) -> Aggregator:
    """Compose aggregators left to right; each one's output kind must be the next's input."""
    if not aggregators:
        raise ValueError("chain needs at least one aggregator")
    for a, b in zip(aggregators, aggregators[1:]):
        if a.output != b.input:
            raise ValueError(
                f"chain: {a.name} gives {a.output} gradients but {b.name} takes {b.input} "
                "gradients"
            )

    def init(params: Grads) -> State:
        return tuple(a.init(params) for a in aggregators)

    needs = tuple(dict.fromkeys(n for a in aggregators for n in a.needs))

    def update(grads: Grads, state: State, **extras: Tensor) -> tuple[Grads, State]:
        new_state = []
        batch = _batch_size(grads)
        for a, s in zip(aggregators, state):
            if a.needs and a.input == "per_example" and _batch_size(grads) != batch:
                raise ValueError(
                    f"chain: {a.name} needs per-example {', '.join(a.needs)} but an earlier "
                    "aggregator changed the batch (e.g. drop_nonfinite), so they no longer line "
                    "up with the gradients; do not combine them"
                )
            grads, s = apply(a, grads, s, **extras)
            new_state.append(s)
        return grads, tuple(new_state)

    name = " > ".join(a.name for a in aggregators)
    return Aggregator(name, init, update, aggregators[0].input, aggregators[-1].output,
                      kind="chain", parts=tuple(aggregators), needs=needs)


def _batch_size(grads: Grads) -> int | None:
    first = next(iter(grads.values()), None)
    return None if first is None or first.ndim == 0 else int(first.shape[0])


def apply(agg: Aggregator, grads: Grads, state: State, **extras: Tensor) -> tuple[Grads, State]:
    """Run ``agg.update`` with the side inputs it declares in ``agg.needs``.

    Args:
        agg: any aggregator.
        grads: name -> ``[B, *shape]`` (or ``shape`` for batch-input aggregators).
        state: its state.
        **extras: side inputs by name (``losses=[B]``, ``positions=[B]``, ...); those
            the aggregator does not need are ignored.

    Raises:
        ValueError: a side input the aggregator needs is missing.
    """
    if not agg.needs:
        return agg.update(grads, state)
    missing = [n for n in agg.needs if extras.get(n) is None]
    if missing:
        raise ValueError(
            f"aggregator {agg.name} needs the per-example {', '.join(missing)}; pass them as "
            f"keyword arguments (gs.aggregate.apply(agg, grads, state, {missing[0]}=...))"
        )
    return agg.update(grads, state, **{n: extras[n] for n in agg.needs})


def write_grads(model: nn.Module, update: Grads) -> None:
    """Write an update (name -> ``param.shape``) into ``param.grad`` for any optimizer."""
    params = dict(model.named_parameters())
    for n, u in update.items():
        p = params[n]
        if u.shape != p.shape:
            raise ValueError(f"update for '{n}' has shape {tuple(u.shape)}, parameter has {tuple(p.shape)}")
        p.grad = u.detach().to(p.dtype).clone() if p.grad is None else p.grad.copy_(u)


#: Per-coordinate reducers by name, for specs and layer-by-layer engines.
REDUCERS: dict[str, Callable[..., Aggregator]] = {
    "mean": mean,
    "winsorize": winsorize,
    "m3": m3,
    "trimmed_mean": trimmed_mean,
    "coordinate_median": coordinate_median,
    "median": coordinate_median,
}
