"""The aggregator contract, shared helpers and the registry of spec names.

An :class:`Aggregator` is an ``(init, update)`` pair in the spirit of optax
(``optax.GradientTransformationExtraArgs``): ``update(grads, state, **side_inputs)``,
where the side inputs (:data:`SIDE_INPUTS`: ``losses``, ``outputs``, ``targets``,
``positions``, ``example_ids``, each ``[B, ...]``) are keyword-only and declared in
``needs``. Next to this *local form* an aggregator may offer

* a **layer-wise form**, used by :mod:`gradsift.aggregate.layerwise` to reduce each
  layer as soon as its per-example gradients exist (or without forming them):

  - ``row_scale`` (:class:`RowScale`): an example-wise stage that multiplies each
    example's gradient of each parameter by a factor computed from the squared
    per-example norms (``clip``) or from side inputs (``group_masking``);
  - ``weighted_sums`` (:class:`WeightedSums`): a reducer that is ``combine`` of ``k``
    weighted sums ``W [k, B] @ G`` (``mean``: k = 1; ``m3``: k = 3 group means and an
    element-wise median; ``gaf``: micro-batch means filtered by cosine). Weighted sums
    come straight from activations and output gradients: the per-example gradients
    never exist;
  - ``per_coordinate``: a reducer ``[B, ...] -> [...]`` acting on each coordinate
    alone (``winsorize``, ``trimmed_mean``, ``coordinate_median``), applied to
    cache-sized blocks of one layer's per-example gradients;

* a **sharded form** ``sharded(grads, state, shard) -> (out, state)``, exact across the
  ranks of a :class:`Shard` (:mod:`gradsift.distributed.reduce`). A ``weighted_sums``
  reducer is sharded for free (one all-reduce of ``k P`` values).

Runners ask these attributes what an aggregator can do; they never look at its name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import NonFiniteGradientError, SpecError
from ..workspace import acquire
from ..specs import Registry, check_options, parse_spec

Grads = dict[str, Tensor]
State = Any
Kind = Literal["per_example", "batch"]

#: Side inputs a training loop can give aggregators (see ``Aggregator.needs``).
SIDE_INPUTS = ("losses", "outputs", "targets", "positions", "example_ids")


# ---------------------------------------------------------------- layer-wise forms

@dataclass(frozen=True)
class RowScale:
    """Layer-wise form of an example-wise stage: per-example factors per parameter.

    Attributes:
        factors: ``(norms_sq, **side_inputs) -> name -> [B]`` factors (or one ``[B]``
            tensor for every parameter), given ``norms_sq`` name -> ``[B]`` squared
            per-example norms of the gradients as this stage receives them. ``None``
            means "not layer-wise for this batch" (the runner then materializes).
        needs_norms: whether ``factors`` reads ``norms_sq`` (else they are not computed
            for it).
    """

    factors: Callable[..., "Grads | Tensor | None"]
    needs_norms: bool = True


@dataclass(frozen=True)
class WeightedSums:
    """Layer-wise and sharded form of a reducer that is ``combine(W @ G)``.

    Attributes:
        weights: ``(B, dtype, device) -> [k, B]``: row j weighs the B examples of sum j.
        combine: name -> ``[k, *shape]`` sums -> name -> ``shape`` update. It sees every
            parameter at once (``gaf`` needs whole-model cosines).
        uniform: ``k = 1`` and every weight is ``1/B``: the sum is the gradient of the mean
            loss, which one ordinary backward pass gives (``mean``).
    """

    weights: Callable[[int, torch.dtype, torch.device], Tensor]
    combine: Callable[[Grads], Grads]
    uniform: bool = False


class Comm(Protocol):
    """What a sharded form needs of a process group (see :mod:`gradsift.distributed.comm`)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, t: Tensor) -> Tensor: ...

    def all_gather(self, t: Tensor) -> list[Tensor]: ...


@dataclass
class Shard:
    """This rank's place in a global batch, for sharded forms.

    Attributes:
        comm: the process group.
        sizes: every rank's number of examples, in rank order (the global batch is the
            shards concatenated in rank order).
        gather_rows: ``[b_r, ...] -> [B, ...]``, every rank's rows in rank order.
        check_finite: ``(grads, who) -> None``, raises on every rank when any rank's
            per-example gradients hold NaN or inf.
    """

    comm: Comm
    sizes: list[int]
    gather_rows: Callable[[Tensor], Tensor]
    check_finite: Callable[[Grads, str], None]

    @property
    def total(self) -> int:
        """B, the global batch size."""
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Position of this rank's first example in the global batch."""
        return sum(self.sizes[: self.comm.rank])

    def all_reduce(self, parts: Grads) -> Grads:
        """Element-wise sum over ranks of every tensor of ``parts`` (one collective)."""
        if not parts:
            return {}
        flat = torch.cat([p.reshape(-1) for p in parts.values()])
        total = self.comm.all_reduce_sum(flat)
        out, start = {}, 0
        for n, p in parts.items():
            out[n] = total[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out


Sharded = Callable[[Grads, State, Shard], "tuple[Grads, State]"]


# ---------------------------------------------------------------- the contract

@dataclass(frozen=True)
class Aggregator:
    """An ``(init, update)`` pair with the kinds of gradients it takes and gives.

    Attributes:
        name: short name, e.g. ``"winsorize(c=2)"``.
        init: ``params -> state``.
        update: ``(grads, state, **side_inputs) -> (update, state)``.
        input: ``"per_example"`` (name -> ``[B, *shape]``) or ``"batch"`` (name -> ``shape``).
        output: ``"per_example"`` or ``"batch"``.
        per_coordinate: layer-wise form of a reducer acting on each coordinate alone,
            ``[B, ...] -> [...]``; ``None`` if it is not one.
        kind: the spec name of the factory (``"winsorize"``), for display and checkpoints
            only: no code switches on it.
        options: the factory's arguments, e.g. ``{"c": 2}``.
        parts: the components of a :func:`chain` (its state is the tuple of theirs).
        example_wise: a per-example -> per-example map acting on each example alone
            (``clip``), so it can run on any shard of a batch.
        needs: side inputs (from :data:`SIDE_INPUTS`) ``update`` takes as keywords.
        row_scale: layer-wise form of an example-wise stage (:class:`RowScale`).
        weighted_sums: layer-wise and sharded form of a reducer (:class:`WeightedSums`).
        sharded: exact form across ranks, ``(grads, state, shard) -> (out, state)``.
        update_in_place: in-place form of a batch -> batch stage, ``(update, state) ->
            state``: changes the update's tensors in place to what ``update`` would return
            (same values). Runners use it on an update they own whose tensors share memory
            with nothing else (:func:`owned`), so that e.g. DP noise needs no second
            ``P``-sized buffer.
    """

    name: str
    init: Callable[[Grads], State]
    update: Callable[..., tuple[Grads, State]]
    input: Kind
    output: Kind
    per_coordinate: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)
    kind: str = ""
    options: dict = field(default_factory=dict, compare=False)
    parts: tuple["Aggregator", ...] = field(default=(), compare=False)
    example_wise: bool = False
    needs: tuple[str, ...] = ()
    row_scale: RowScale | None = field(default=None, compare=False)
    weighted_sums: WeightedSums | None = field(default=None, compare=False)
    sharded: Sharded | None = field(default=None, compare=False)
    update_in_place: Callable[[Grads, State], State] | None = field(default=None, compare=False)

    @property
    def needs_per_example(self) -> bool:
        return self.input == "per_example"

    @property
    def stages(self) -> tuple["Aggregator", ...]:
        """The components of a chain, or ``(self,)``."""
        return self.parts or (self,)

    def __repr__(self) -> str:
        return f"Aggregator({self.name})"


# ---------------------------------------------------------------- shared helpers

def empty_guard(x: Tensor) -> Tensor | None:
    """Zeros ``[...]`` for an empty batch ``x [0, ...]``, else ``None``."""
    return x.new_zeros(x.shape[1:]) if x.shape[0] == 0 else None


def flat_rows(g: Tensor) -> Tensor:
    """``[B, *shape] -> [B, prod(shape)]`` (scalar parameters too: ``[B] -> [B, 1]``)."""
    return g.flatten(1) if g.ndim > 1 else g.unsqueeze(1)


def row_view(f: Tensor, g: Tensor) -> Tensor:
    """Per-example factors ``[B]`` viewed to broadcast over ``g [B, *shape]``."""
    return f.view(-1, *([1] * (g.ndim - 1))).to(g.dtype)


def squared_norms(grads: Grads) -> Grads:
    """name -> ``[B]`` squared L2 norm of each example's gradient of that parameter."""
    return {n: flat_rows(g).square().sum(1) for n, g in grads.items()}


def finite_rows(grads: Grads) -> Tensor | None:
    """``[B]`` bool: the example's gradient is finite in every layer (``None`` if no layers)."""
    ok: Tensor | None = None
    for g in grads.values():
        row_ok = torch.isfinite(flat_rows(g)).all(1)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def check_finite(grads: Grads, who: str) -> None:
    """Raise :class:`NonFiniteGradientError` naming the batch positions whose per-example
    gradient holds NaN or inf (and the fixes)."""
    if all(bool(torch.isfinite(g.sum())) for g in grads.values()):
        return  # a finite sum has no NaN or inf term: one pass, no B x P bool mask
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


def group_slices(b: int, groups: int) -> list[slice]:
    """Contiguous groups with sizes as equal as possible (``numpy.array_split`` rule)."""
    base, extra = divmod(b, groups)
    out, start = [], 0
    for k in range(groups):
        size = base + (1 if k < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def group_weights(b: int, groups: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[groups, B]``: row j is ``1 / |group j|`` on the examples of contiguous group j
    (:func:`group_slices`), 0 elsewhere; empty groups get a zero row."""
    w = torch.zeros(groups, b, dtype=dtype, device=device)
    for j, s in enumerate(group_slices(b, groups)):
        if s.stop > s.start:
            w[j, s] = 1.0 / (s.stop - s.start)
    return w


#: Elements per block of :func:`by_column_blocks` (about 1 MB of float32: cache-sized).
SELECT_BLOCK_ELEMENTS = 1 << 18


def by_column_blocks(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a per-coordinate selection ``fn: [n, B] -> [n]`` to ``x [B, ...] -> [...]``,
    a cache-sized block of coordinates at a time, each block transposed so that every
    coordinate's B values are contiguous (selection along the strided batch axis is
    several times slower). Each block is copied into one reused scratch buffer (a
    :mod:`gradsift.workspace` pool buffer), which ``fn`` may overwrite (sort in place)."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    n = flat.shape[1]
    out = flat.new_empty(n)
    block = max(1, SELECT_BLOCK_ELEMENTS // max(b, 1))
    scratch = acquire(min(block, n) * b, dtype=flat.dtype, device=flat.device, kind="scratch")
    for start in range(0, n, block):
        cols = flat[:, start : start + block]
        t = scratch[: cols.numel()].view(cols.shape[1], b)
        t.copy_(cols.T)
        out[start : start + block] = fn(t)
    return out.view(x.shape[1:])


def sort_rows_(t: Tensor) -> Tensor:
    """Sort each row of a contiguous 2-D tensor ``[n, B]`` in place, ascending (NumPy's
    vectorized sort on CPU float32/float64, several times faster than ``torch.sort`` on
    short rows; ``torch.sort`` elsewhere). Returns ``t``."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous() \
            and not t.requires_grad and t.ndim == 2:
        t.numpy().sort(axis=1)
        return t
    t.copy_(torch.sort(t, dim=1).values)
    return t


class PerCoordinate:
    """A per-coordinate reducer in two layouts, and optionally a third form (a
    ``per_coordinate`` form).

    * ``rows(t)``: ``[n, B] -> [n]``, each row one coordinate's B values, contiguous, in a
      scratch buffer that ``rows`` may overwrite (e.g. sort in place). Layer rules that
      form per-example gradients coordinate-major call it directly
      (:meth:`gradsift.layers.LayerRule.reduced`), with no transpose.
    * calling it: ``[B, ...] -> [...]``, batch first: ``batch_first`` when given, else
      ``rows`` over transposed column blocks (:func:`by_column_blocks`).
    * ``outer(d, a)``, optional: the reduction of per-example outer products,
      ``d [B, O], a [B, K] -> [O, K]`` with example i's values ``d[i, o] a[i, k]`` (a
      Linear layer's weight at one position), or None where it does not apply (the rule
      then forms ``rows`` blocks). Called only when every product is finite.
    """

    def __init__(self, rows: Callable[[Tensor], Tensor],
                 batch_first: Callable[[Tensor], Tensor] | None = None,
                 outer: Callable[[Tensor, Tensor], Tensor | None] | None = None) -> None:
        self.rows = rows
        self.batch_first = batch_first
        self.outer = outer

    def __call__(self, x: Tensor) -> Tensor:
        if self.batch_first is not None:
            return self.batch_first(x)
        empty = empty_guard(x)
        if empty is not None:
            return empty
        return by_column_blocks(x, self.rows)


def median3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Element-wise median of three tensors of the same shape."""
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def weighted_update(form: WeightedSums, grads: Grads) -> Grads:
    """The local form of a :class:`WeightedSums` reducer: ``combine(W @ G)`` on
    materialized per-example gradients name -> ``[B, *shape]``."""
    if not grads:
        return {}
    first = next(iter(grads.values()))
    w = form.weights(first.shape[0], first.dtype, first.device)
    sums = {n: torch.tensordot(w.to(g.dtype), g, dims=1) for n, g in grads.items()}
    return form.combine(sums)


def weighted_sharded(form: WeightedSums, who: str) -> Sharded:
    """The sharded form of a :class:`WeightedSums` reducer: this rank's columns of the
    global ``W``, one all-reduce of the ``k P`` partial sums, then ``combine``."""

    def sharded(grads: Grads, state: State, shard: Shard) -> tuple[Grads, State]:
        shard.check_finite(grads, who)
        if not grads:
            return {}, state
        first = next(iter(grads.values()))
        w = form.weights(shard.total, first.dtype, first.device)
        mine = w[:, shard.offset : shard.offset + first.shape[0]]
        sums = shard.all_reduce({n: torch.tensordot(mine.to(g.dtype), g, dims=1) for n, g in grads.items()})
        return form.combine(sums), state

    return sharded


def reducer(name: str, kind: str, *, per_coordinate: Callable[[Tensor], Tensor] | None = None,
            weighted_sums: WeightedSums | None = None, sharded: Sharded | None = None,
            **options: Any) -> Aggregator:
    """A stateless per-example -> batch reducer from its math.

    Give ``weighted_sums`` (then the local and sharded forms follow from it) or
    ``per_coordinate`` ``[B, ...] -> [...]`` (and optionally an exact ``sharded`` form).
    Every reducer raises :class:`NonFiniteGradientError` on non-finite input.
    """
    if weighted_sums is not None:
        form = weighted_sums

        def update(grads: Grads, state: State) -> tuple[Grads, State]:
            check_finite(grads, name)
            return weighted_update(form, grads), state

        sharded = sharded or weighted_sharded(form, name)
    elif per_coordinate is not None:
        fn = per_coordinate

        def update(grads: Grads, state: State) -> tuple[Grads, State]:
            check_finite(grads, name)
            return {n: fn(g) for n, g in grads.items()}, state
    else:
        raise ValueError("a reducer needs weighted_sums or per_coordinate")
    return Aggregator(name, lambda params: (), update, "per_example", "batch",
                      per_coordinate=per_coordinate, kind=kind, options=options,
                      weighted_sums=weighted_sums, sharded=sharded)


# ---------------------------------------------------------------- composition

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
        batch = batch_size(grads)
        for a, s in zip(aggregators, state):
            if a.needs and a.input == "per_example" and batch_size(grads) != batch:
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


def batch_size(grads: Grads) -> int | None:
    """B of per-example gradients name -> ``[B, ...]`` (``None`` if there are none)."""
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


def write_grads(model: nn.Module, update: Grads, *, copy: bool = False) -> None:
    """Write an update (name -> ``param.shape``) into ``param.grad`` for any optimizer.

    An existing ``.grad`` is overwritten in place. Where ``.grad`` is ``None`` (after
    ``zero_grad(set_to_none=True)``), the update's own tensor becomes the gradient when it
    already has the parameter's dtype, device and a dense layout: no copy, no second ``P``
    floats at the peak. An optimizer or ``GradScaler`` that then changes ``.grad`` in
    place changes ``update`` too; ``copy=True`` keeps them apart. (:func:`step_update`'s
    updates never share memory with the aggregator's state.)
    """
    params = dict(model.named_parameters())
    for n, u in update.items():
        p = params[n]
        if u.shape != p.shape:
            raise ValueError(f"update for '{n}' has shape {tuple(u.shape)}, parameter has {tuple(p.shape)}")
        if p.grad is not None:
            p.grad.copy_(u)
        elif copy or u.dtype != p.dtype or u.device != p.device or not u.is_contiguous() \
                or u.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
            p.grad = u.detach().to(p.device, p.dtype).clone()
        else:
            p.grad = u.detach()


def _storages(state: State) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {t.untyped_storage().data_ptr() for t in tree_leaves(state) if isinstance(t, Tensor)}


def unshared(update: Grads, state: State) -> Grads:
    """``update`` with every tensor that shares memory with a tensor of ``state`` copied, so
    that writing it into ``.grad`` (:func:`write_grads`) can never change the state."""
    held = _storages(state)
    if not held:
        return update
    return {n: u.clone() if u.untyped_storage().data_ptr() in held else u for n, u in update.items()}


def owned(update: Grads, state: State) -> bool:
    """Every tensor of ``update`` has memory of its own: none shares it with another or with
    a tensor of ``state`` (autograd may hand two parameters one gradient tensor; a stage
    may return its state). Then changing one in place changes nothing else."""
    seen = _storages(state)
    for u in update.values():
        ptr = u.untyped_storage().data_ptr()
        if ptr in seen or u.requires_grad:
            return False
        seen.add(ptr)
    return True


# ---------------------------------------------------------------- registry of spec names

#: Aggregator factories by spec name; each aggregator's file registers its own.
AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry("aggregator")


def register_aggregator(name: str, factory: Callable[..., Aggregator] | None = None, *,
                        aliases: Sequence[str] = ()):
    """Make a factory available to specs (CLI, ``fit(aggregator="name:k=v")``, docs).

    As a decorator: ``@register_aggregator("gaf")``; or a call:
    ``register_aggregator("mine", my_factory)``. The factory's annotated keyword
    parameters are the spec's options (type-checked when parsed).
    """
    return AGGREGATORS.register(name, factory, aliases=tuple(aliases))


def aggregator_from_spec(spec: str) -> Aggregator:
    """Build an aggregator from a spec: ``"mean"``, ``"winsorize:c=2"``,
    ``"trimmed_mean:fraction=0.1"``, ``"clip:max_norm=1+mean"`` (``+`` chains).

    Raises:
        SpecError: an unknown name, an unknown option or one of the wrong type, a key
            given twice, or a chain whose kinds do not fit (``clip`` alone gives
            per-example gradients; ``mean+clip`` clips after reducing; ``m3+m3``
            reduces twice) -- each with the fix.
    """
    parts = [p for p in spec.split("+") if p.strip()]
    if not parts:
        raise SpecError(f"empty aggregator spec '{spec}'")
    built: list[Aggregator] = []
    for part in parts:
        name, kwargs = parse_spec(part)
        factory = AGGREGATORS.get(name) if name in AGGREGATORS else None
        if factory is None:
            raise SpecError(f"unknown aggregator '{name}' in '{spec}'. Known: {', '.join(AGGREGATORS)}")
        try:
            check_options(f"aggregator '{name}' in '{spec}'", factory, kwargs)
            built.append(factory(**kwargs))
        except SpecError as e:
            raise SpecError(f"bad options for {e}") from None
        except (TypeError, ValueError) as e:
            raise SpecError(f"bad options for aggregator '{name}' in '{spec}': {e}") from None
    for (a, pa), (b, pb) in zip(zip(built, parts), zip(built[1:], parts[1:])):
        if a.output != b.input:
            sa, sb = pa.strip(), pb.strip()
            if a.output == "batch" and a.input == "batch":
                fix = f"batch stages go after the reducer: '{sb}+{sa}'"
            elif a.output == "batch" and b.output == "per_example":
                fix = f"per-example stages go before the reducer: '{sb}+{sa}'"
            elif a.output == "batch" and sa == sb:
                fix = f"'{sa}' already reduces the batch; give it once: '{sa}'"
            elif a.output == "batch":
                fix = f"'{sa}' already reduces the batch; use one reducer ('{sa}' or '{sb}')"
            else:
                fix = f"'{sb}' takes batch gradients; put a reducer before it: '{sa}+mean+{sb}'"
            raise SpecError(f"aggregator spec '{spec}': {a.name} gives {a.output} gradients but "
                            f"{b.name} takes {b.input} gradients. {fix}")
    if built[-1].output != "batch":
        raise SpecError(
            f"aggregator spec '{spec}' ends with {built[-1].name}, which gives per-example "
            f"gradients; chain a reducer after it, e.g. '{spec}+mean'"
        )
    return built[0] if len(built) == 1 else chain(*built)


def factory_options(name: str) -> dict[str, Any]:
    """A registered factory's options and their defaults (for help texts and docs)."""
    sig = inspect.signature(AGGREGATORS.get(name))
    return {n: (None if p.default is p.empty else p.default) for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def clip_factors(norms: Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Per-example scale ``min(1, max_norm / (norm + eps))``: ``[B] -> [B]``."""
    return (max_norm / (norms + eps)).clamp(max=1.0)


__all__ = [
    "Aggregator", "RowScale", "WeightedSums", "Shard", "SIDE_INPUTS", "Grads", "State",
    "chain", "apply", "write_grads", "unshared", "flat_rows", "finite_rows", "check_finite",
    "squared_norms", "group_slices", "group_weights", "median3", "reducer",
    "weighted_update", "weighted_sharded", "row_view", "empty_guard", "batch_size", "by_column_blocks",
    "AGGREGATORS", "register_aggregator", "aggregator_from_spec", "factory_options",
    "clip_factors", "PerCoordinate", "sort_rows_",
]
