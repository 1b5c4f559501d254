"""The layer-rule contract, its registry and what a rule receives (:class:`Capture`).

A *layer rule* says, for one module type, how to get per-example quantities of the
module's own trainable parameters from what one batched forward and backward pass
recorded: the layer's inputs and the gradient of ``sum_i loss_i`` with respect to its
output. Only :meth:`LayerRule.grads` is required; the other methods have defaults derived
from it that a rule overrides when it has a cheaper closed form (ghost norms, weighted
sums, block-wise reductions, Gram matrices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

Grads = dict[str, Tensor]


def own_trainable(module: nn.Module) -> dict[str, Tensor]:
    """The module's own (not its children's) parameters with ``requires_grad=True``.

    Returns:
        local name (``"weight"``, ``"bias"``) -> parameter.
    """
    own = getattr(module, "_parameters", None)
    if not isinstance(own, dict):  # not a plain nn.Module: the public (slower) walk
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    # A hot path (called per layer, several times per step): nn.Module's own table, with
    # named_parameters' rule that a parameter registered under two names counts once.
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for n, p in own.items():
        if p is not None and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[n] = p
    return out


@dataclass
class Capture:
    """What one forward/backward pass recorded for one layer (over all its calls).

    Every tensor has the batch on axis 0 (the recorder moves it there).

    Attributes:
        module: the layer.
        inputs: per call, the first positional input ``[B, ...]`` (detached).
        grad_outputs: per call, ``d sum_i loss_i / d output`` ``[B, ...]``.
        args: per call, all positional inputs (detached; the first is ``inputs[k]``).
        kwargs: per call, the keyword inputs (detached).
        outputs: per call, the output during recording (emptied after the backward pass).
        extra_grads: per call, the gradients of a multi-output layer's other outputs
            (:attr:`LayerRule.multi_output`; e.g. an LSTM's ``h_n``, ``c_n``), batch first.
        replays: per call, what a rule's own recording forward (``record_forward``) kept
            for it (``None`` when the layer ran its own forward). A dict may list tensors
            inside the layer under ``"grad_of"``: the recording's backward pass then puts
            their gradients (``None`` where none) in its ``"grads"``.
    """

    module: nn.Module
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grad_outputs: list[Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    extra_grads: list[tuple[Tensor, ...]] = field(default_factory=list)
    extra_outputs: list[tuple[Tensor, ...]] = field(default_factory=list)
    replays: list[Any] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """``B`` (0 when the layer was never called with a gradient)."""
        return int(self.grad_outputs[0].shape[0]) if self.grad_outputs else 0


class LayerRule:
    """How to get per-example quantities of one layer type's own parameters.

    Subclass it, implement :meth:`grads`, and register it for module types with
    :func:`register_layer_rule`. Every method receives a :class:`Capture` whose tensors
    have the batch on axis 0, and returns a dict keyed by the module's *local*
    parameter names (``"weight"``, ``"bias"``), restricted to trainable ones
    (:func:`own_trainable`).

    Attributes:
        batch_axis_free: whether the layer acts on each position of its input alone, so
            that the batch may sit on any axis before its feature axes (Linear,
            Embedding, LayerNorm); else the batch must be axis 0 (Conv, GroupNorm).
        feature_axes: trailing input axes the layer acts on when ``batch_axis_free``.
        multi_output: the layer returns several tensors (RNNs); the rule then gives
            :meth:`output_tensors` and :meth:`output_tags`.
    """

    batch_axis_free: ClassVar[bool] = False
    feature_axes: ClassVar[int] = 1
    multi_output: ClassVar[bool] = False

    def output_tensors(self, output: Any) -> list[Tensor]:
        """A multi-output layer's output tensors (the first is the main one)."""
        return [output]

    def output_tags(self, module: nn.Module, in_tag: Any, outputs: list[Tensor]) -> list[Any] | str:
        """A multi-output layer's output batch tags ``(axis, 1)``, by construction, or why not."""
        raise NotImplementedError

    def supports(self, module: nn.Module) -> bool:
        """Whether this rule handles this instance (e.g. an option it does not cover)."""
        return True

    def unsupported_reason(self, module: nn.Module) -> str:
        """Why :meth:`supports` is false for this instance (shown by ``layers.explain``)."""
        return f"{type(self).__name__} does not support these options"

    def parameters(self, module: nn.Module) -> dict[str, Tensor]:
        """The trainable parameters this rule gives gradients for, by name relative to the
        module. Default: the module's own (:func:`own_trainable`); a rule may also cover a
        child that is never called as a module (``MultiheadAttention.out_proj``)."""
        return own_trainable(module)

    def check_call(
        self, module: nn.Module, args: tuple, kwargs: dict, tag: Callable[[Tensor], Any], batch: int
    ) -> str | None:
        """A multi-output layer's check of its other tensor arguments: why this call is not
        handled, or ``None``. ``tag(t)`` is a tensor's batch tag (``(axis, inner)``, ``None``
        when it does not depend on the inputs, ``(-1, -1)`` when unknown); ``batch`` is ``B``."""
        return None

    def batch_axis_ok(self, module: nn.Module, ndim: int, axis: int) -> bool:
        """Whether an input with ``ndim`` axes and the batch on ``axis`` is handled."""
        if self.batch_axis_free:
            return 0 <= axis < ndim - self.feature_axes_of(module)
        return axis == 0

    def feature_axes_of(self, module: nn.Module) -> int:
        """Trailing axes the layer acts on (see :attr:`feature_axes`)."""
        return self.feature_axes

    def grads(self, cap: Capture) -> Grads:
        """Per-example gradients: local name -> ``[B, *param.shape]`` (summed over calls)."""
        raise NotImplementedError

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        """Write the per-example gradients into ``out`` (local name -> ``[B, *param.shape]``
        tensors, e.g. views of a :mod:`gradsift.workspace` buffer), or add them to what it
        holds when ``accumulate``. The default copies :meth:`grads`; rules override it to
        write in place.

        Returns:
            the local names written (a parameter left out has a zero gradient).
        """
        grads = self.grads(cap)
        for n, g in grads.items():
            if accumulate:
                out[n].add_(g)
            else:
                out[n].copy_(g)
        return set(grads)

    def norms_sq(self, cap: Capture) -> Grads:
        """Squared L2 norms of the per-example gradients: local name -> ``[B]``."""
        return {n: sum_of_squares(g.flatten(1), 1) for n, g in self.grads(cap).items()}

    def weighted_sum(self, cap: Capture, weights: Tensor) -> Grads:
        """``sum_i weights_i * g_i``: local name -> ``param.shape``; ``weights`` is ``[B]``."""
        return {n: torch.tensordot(weights.to(g.dtype), g, dims=1) for n, g in self.grads(cap).items()}

    def reduced(
        self,
        cap: Capture,
        reducer: Callable[[Tensor], Tensor],
        factors: Callable[[str], Tensor | None],
    ) -> Grads | None:
        """Per-coordinate reduction of the per-example gradients.

        Args:
            reducer: ``[B, ...] -> [...]``, acting on each coordinate independently.
            factors: local name -> per-example scale ``[B]`` (clipping) or ``None``.

        Returns:
            local name -> ``param.shape``, or ``None`` if a per-example gradient is not
            finite.
        """
        out: Grads = {}
        for local, g in self.grads(cap).items():
            f = factors(local)
            if f is not None:
                g = g * f.view(-1, *([1] * (g.ndim - 1))).to(g.dtype)
            if not bool(torch.isfinite(g.sum())):
                return None
            out[local] = reducer(g)
        return out

    def gram(self, cap: Capture) -> Grads:
        """Gram matrices ``G[i, j] = <g_i, g_j>`` of the per-example gradients: local -> ``[B, B]``."""
        out: Grads = {}
        for n, g in self.grads(cap).items():
            flat = g.flatten(1)
            out[n] = flat @ flat.T
        return out


#: Module type (or its ``"module.QualName"``) -> :class:`LayerRule`. Exact types: a subclass
#: may change ``forward``.
RULES: dict[type[nn.Module] | str, LayerRule] = {}


def sum_of_squares(x: Tensor, start_dim: int = 2) -> Tensor:
    """``x.square().sum`` over every axis from ``start_dim`` on (``[B, G, ...] -> [B, G]``
    by default), as a norm reduction: no temporary the size of ``x``, within float
    rounding of the sum."""
    dims = tuple(range(start_dim, x.ndim))
    return torch.linalg.vector_norm(x, dim=dims).square() if dims else x.square()


#: The cost of writing one value, in multiply-adds, when :func:`outer_norms_sq` picks its
#: route: on the CPU a freshly written ``[B, O, K]`` block costs far more than its
#: arithmetic (first-touch page faults, memory traffic). 16 picks the faster route at every
#: shape measured (B = 32, T = 8..512, K, O = 64..3072).
WRITE_COST = 16


def outer_norms_sq(d: Tensor, a: Tensor) -> Tensor:
    """``sum_g ||sum_t d_gt a_gt^T||_F^2`` per example: the squared norm of a per-example
    gradient that is a sum of outer products over positions.

    Args:
        d: ``[B, G, T, O]`` output gradients (``G`` groups, ``T`` positions), or
            ``[B, T, O]`` (one group).
        a: ``[B, G, T, K]`` inputs, or ``[B, T, K]``.

    Returns:
        ``[B]``. By the ``T x T`` Gram matrices (ghost norm, ``sum (A A^T) * (D D^T)``)
        or by forming the ``[B, G, O, K]`` products, whichever costs less: multiply-adds
        plus :data:`WRITE_COST` per value written.
    """
    if not (d.ndim == a.ndim and d.ndim in (3, 4) and d.shape[:-1] == a.shape[:-1]):
        raise ValueError(f"outer_norms_sq: d {tuple(d.shape)} and a {tuple(a.shape)} must be [B, (G,) T, O] and "
                         "[B, (G,) T, K], with the same leading axes")
    t, k, o = a.shape[-2], a.shape[-1], d.shape[-1]
    ghost = t * t * (k + o) + WRITE_COST * 2 * t * t
    formed = t * k * o + WRITE_COST * k * o
    if ghost < formed:
        gram_a = (a @ a.transpose(-2, -1)).flatten(1)  # [B, G * T * T]
        gram_d = (d @ d.transpose(-2, -1)).flatten(1)
        return torch.linalg.vecdot(gram_a, gram_d)
    return sum_of_squares(torch.matmul(d.transpose(-2, -1), a), 1)


def type_name(t: type) -> str:
    """``"package.module.QualName"`` of a class, the string form of a :data:`RULES` key."""
    return f"{t.__module__}.{t.__qualname__}"


def register_layer_rule(*module_types: type[nn.Module] | str):
    """Class decorator registering a :class:`LayerRule` for ``module_types``.

    Example::

        @register_layer_rule(nn.Linear)
        class LinearRule(LayerRule): ...

    A type may also be named by its ``"package.module.QualName"`` string, so that a rule
    for a third-party layer does not import its package (e.g.
    ``"transformers.pytorch_utils.Conv1D"``). A later registration for the same type
    replaces the earlier one. The rule class is instantiated once (without arguments)
    and returned unchanged.
    """
    ok = all(isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module)) for t in module_types)
    if not module_types or not ok:
        raise TypeError("register_layer_rule takes nn.Module subclasses or their 'module.QualName' strings")

    def decorate(cls):
        rule = cls() if isinstance(cls, type) else cls
        if not isinstance(rule, LayerRule):
            raise TypeError(f"{cls!r} is not a LayerRule (subclass gradsift.layers.LayerRule)")
        for t in module_types:
            RULES[t] = rule
        return cls

    return decorate


def shared_or_batch(t: Tensor | None, tag: Any, axis: int, batch: int) -> bool:
    """Whether ``t`` (an extra argument: a mask, an initial state) is per-example along
    ``axis`` by construction (tag ``(axis, 1)``), or the same for every example (no tag and
    equal slices along ``axis``, or size 1 there), or absent."""
    if t is None:
        return True
    if tag is not None:
        return tuple(tag) == (axis, 1)
    if t.ndim <= axis:
        return False
    if t.shape[axis] == 1:
        return True
    if t.shape[axis] != batch:
        return False
    first = t.narrow(axis, 0, 1)
    return bool((t == first).all())


def rule_for(module: nn.Module) -> LayerRule | None:
    """The registered rule handling this module, or ``None`` (exact type match)."""
    rule = RULES.get(type(module)) or RULES.get(type_name(type(module)))
    if rule is None or not rule.supports(module):
        return None
    return rule
