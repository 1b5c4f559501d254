"""Whole-model results from a :class:`~gradsift.layers.record.Recording`, layer rule by layer rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import Tensor, nn

from ..inputs import Inputs
from .base import RULES, Capture, Grads, own_trainable, rule_for
from .record import LossFn, NotHookable, Recording, record


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of modules that own trainable parameters but have no layer rule.

    A module whose parameters are all also owned by layers with rules (a bias tied to
    a child's, as in BERT's ``cls.predictions.bias``) is covered by those layers.
    """
    covered = {id(p) for m in model.modules() if rule_for(m) is not None for p in rule_for(m).parameters(m).values()}
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if rule_for(m) is None and any(id(p) not in covered for p in own_trainable(m).values())
    ]


def check_hookable(model: nn.Module) -> None:
    """Raise :class:`NotHookable` naming the layers without a layer rule."""
    bad = unsupported_layers(model)
    if bad:
        known = ", ".join(sorted({t if isinstance(t, str) else t.__name__ for t in RULES}))
        raise NotHookable(
            f"layer(s) {bad} own trainable parameters but have no layer rule (rules exist for: "
            f"{known}); use method='vmap' or 'auto', or register a rule with "
            "gradsift.layers.register_layer_rule"
        )


def _rule(cap: Capture):
    rule = rule_for(cap.module)
    if rule is None:
        raise NotHookable(f"no layer rule for {type(cap.module).__name__}")
    return rule


def layer_grads(cap: Capture) -> Grads:
    """Per-example gradients of one layer's own trainable parameters.

    Returns:
        local parameter name (``"weight"``, ``"bias"``) -> ``[B, *param.shape]``.
    """
    return _rule(cap).grads(cap) if cap.inputs else {}


def layer_norms_sq(cap: Capture) -> Grads:
    """Squared L2 norms of one layer's per-example gradients (ghost norms where cheaper).

    Returns:
        local parameter name -> ``[B]``.
    """
    return _rule(cap).norms_sq(cap) if cap.inputs else {}


def layer_weighted_sum(cap: Capture, weights: Tensor) -> Grads:
    """``sum_i weights_i * g_i`` of one layer's per-example gradients (``weights`` ``[B]``).

    Returns:
        local parameter name -> ``param.shape``.
    """
    return _rule(cap).weighted_sum(cap, weights) if cap.inputs else {}


def layer_reduced(
    cap: Capture,
    reducer: Callable[[Tensor], Tensor],
    factors: Callable[[str], Tensor | None],
) -> Grads | None:
    """Per-coordinate reduction of one layer's per-example gradients (see :meth:`LayerRule.reduced`).

    Args:
        reducer: ``[B, ...] -> [...]`` acting on each coordinate independently.
        factors: local parameter name -> per-example scale ``[B]`` (clipping) or ``None``.

    Returns:
        local name -> ``param.shape``, or ``None`` if a per-example gradient is not finite.
    """
    return _rule(cap).reduced(cap, reducer, factors) if cap.inputs else {}


def layer_gram(cap: Capture) -> Grads:
    """Gram matrices of one layer's per-example gradients: local name -> ``[B, B]``."""
    return _rule(cap).gram(cap) if cap.inputs else {}


def parameter_names(model: nn.Module, layers: dict[str, nn.Module]) -> dict[tuple[str, str], str]:
    """(layer name, local name) -> the parameter's name in ``model.named_parameters()``.

    A parameter shared by several layers maps to its one (first) name, so the
    contributions of all its uses add up.
    """
    first: dict[int, str] = {}
    for n, p in model.named_parameters():
        first.setdefault(id(p), n)
    out = {}
    for lname, m in layers.items():
        for local, p in rule_for(m).parameters(m).items():
            out[(lname, local)] = first[id(p)]
    return out


def iter_layer_results(
    model: nn.Module, rec: Recording, fn: Callable[[Capture], Grads]
) -> Iterator[tuple[str, Tensor]]:
    """Apply a per-layer function and yield ``(parameter name, result)``, layer by layer."""
    names = parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    for lname, cap in rec.captures.items():
        for local, value in fn(cap).items():
            yield names[(lname, local)], value


def _accumulate(target: Grads, name: str, value: Tensor) -> None:
    target[name] = target[name] + value if name in target else value


def hook_per_example(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor, *, out: Grads | None = None
) -> tuple[Tensor, Grads, Tensor]:
    """Per-example ``(losses [B], grads name -> [B, *shape], outputs)`` by layer rules.

    Args:
        out: name -> ``[B, *param.shape]`` tensors to write the gradients into (e.g. views
            of a :mod:`gradsift.workspace` buffer), one per trainable parameter; ``None``
            allocates them. Each rule writes in place (:meth:`LayerRule.grads_into`).
    """
    check_hookable(model)
    rec = record(model, loss_fn, inputs, targets)
    b = rec.losses.shape[0]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.new_empty((b, *p.shape)) for n, p in params.items()} if out is None else out
    names = parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    written: set[str] = set()
    for lname, cap in rec.captures.items():
        if not cap.inputs:
            continue
        local = {loc: names[(lname, loc)] for loc in _rule(cap).parameters(cap.module)}
        again = {loc for loc, n in local.items() if n in written}
        if again and again != set(local):  # partly shared: start the others at zero
            for loc, n in local.items():
                if loc not in again:
                    grads[n].zero_()
                    written.add(n)
        done = _rule(cap).grads_into(cap, {loc: grads[n] for loc, n in local.items()}, accumulate=bool(again))
        written.update(local[loc] for loc in done)
    for n in params:
        if n not in written:
            grads[n].zero_()
    return rec.losses, grads, rec.outputs


def hook_norms_sq(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor
) -> tuple[Tensor, Grads, Tensor]:
    """Per-example ``(losses [B], squared norms name -> [B], outputs)`` by ghost norms."""
    check_hookable(model)
    rec = record(model, loss_fn, inputs, targets)
    return rec.losses, recording_norms_sq(model, rec), rec.outputs


def recording_norms_sq(model: nn.Module, rec: Recording) -> Grads:
    """Squared per-example norms (name -> ``[B]``) from a recording.

    A parameter shared by several layers has its per-example gradient materialized
    (the norm of a sum is not the sum of norms).
    """
    layers = {n: c.module for n, c in rec.captures.items()}
    names = parameter_names(model, layers)
    uses: dict[str, int] = {}
    for v in names.values():
        uses[v] = uses.get(v, 0) + 1
    shared = {v for v, k in uses.items() if k > 1}
    out: Grads = {}
    shared_grads: Grads = {}
    for lname, cap in rec.captures.items():
        own = {names[(lname, local)] for local in rule_for(cap.module).parameters(cap.module)}
        if own & shared:
            for local, g in layer_grads(cap).items():
                n = names[(lname, local)]
                if n in shared:
                    _accumulate(shared_grads, n, g)
                else:
                    out[n] = g.flatten(1).square().sum(1)
        else:
            for local, v in layer_norms_sq(cap).items():
                out[names[(lname, local)]] = v
    for n, g in shared_grads.items():
        out[n] = g.flatten(1).square().sum(1)
    b = rec.losses.shape[0]
    for n, p in model.named_parameters():
        if p.requires_grad and n not in out:
            out[n] = p.new_zeros(b)
    return out




@dataclass
class Plan:
    """Which path the engine takes for a model (and batch), and why.

    Attributes:
        method: ``"hooks"`` (layer rules) or ``"vmap"`` (torch.func, whole model).
        reason: why the hooks path was refused (``None`` when it is taken).
        layers: every module owning trainable parameters -> its rule's class name, or
            why it has none.
    """

    method: str
    reason: str | None
    layers: dict[str, str]

    def __str__(self) -> str:
        lines = [f"method: {self.method}" + (f" ({self.reason})" if self.reason else "")]
        lines += [f"  {name}: {what}" for name, what in self.layers.items()]
        return "\n".join(lines)


def explain(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    inputs: Inputs | None = None,
    targets: Tensor | None = None,
) -> Plan:
    """Which path ``method="auto"`` takes for this model (and batch), layer by layer, and why.

    Without a batch only the layer rules are checked; with ``loss_fn``, ``inputs`` and
    ``targets`` the hooks path is also tried (one forward and backward pass), which
    reports a batch axis the trace cannot follow or a parameter used outside its layer.

    Example::

        print(gs.layers.explain(model, loss_fn, inputs, targets))
    """
    per_layer: dict[str, str] = {}
    for name, m in model.named_modules():
        if not own_trainable(m):
            continue
        rule = rule_for(m)
        if rule is not None:
            per_layer[name or type(m).__name__] = f"hooks ({type(rule).__name__})"
        elif (name or type(m).__name__) not in unsupported_layers(model):
            per_layer[name or type(m).__name__] = "hooks (its parameters are covered by another layer's rule)"
        elif type(m) in RULES:
            per_layer[name or type(m).__name__] = f"no rule: {RULES[type(m)].unsupported_reason(m)}"
        else:
            per_layer[name or type(m).__name__] = f"no rule for {type(m).__name__}"
    bad = unsupported_layers(model)
    if bad:
        return Plan("vmap", f"no layer rule for {bad}", per_layer)
    if loss_fn is not None and inputs is not None and targets is not None:
        try:
            record(model, loss_fn, inputs, targets)
        except NotHookable as err:
            return Plan("vmap", str(err), per_layer)
    return Plan("hooks", None, per_layer)
