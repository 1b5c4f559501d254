"""One forward and one backward pass recording each hooked layer's inputs and output grads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import UnsupportedModelError
from .base import Capture, own_trainable, rule_for

LossFn = Callable[[Any, Tensor], Tensor]


class NotHookable(UnsupportedModelError):
    """The model (or this batch) cannot use the hook path; use the torch.func path."""


def hooked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules owning trainable parameters that have a layer rule, by module name."""
    return {name: m for name, m in model.named_modules() if own_trainable(m) and rule_for(m) is not None}


_ATTRIBUTE_READS = {
    Tensor.shape.__get__, Tensor.dtype.__get__, Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.requires_grad.__get__, Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.size, Tensor.dim, Tensor.numel,
}


class _ParameterUseGuard(TorchFunctionMode):
    """Notes any torch operation on a trainable parameter outside a hooked layer."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params
        self.depth = 0
        self.violation: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0 and self.violation is None and func not in _ATTRIBUTE_READS:
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, Tensor) and id(leaf) in self.params:
                    self.violation = getattr(func, "__name__", str(func))
                    break
        return func(*args, **kwargs)


@dataclass
class Recording:
    """Result of :func:`record`: per-example losses, outputs and layer captures.

    Attributes:
        losses: ``[B]`` per-example losses (detached).
        outputs: the model's output (detached), as the model returned it.
        captures: layer name -> :class:`~gradsift.layers.Capture`.
    """

    losses: Tensor
    outputs: Any
    captures: dict[str, Capture]


def _detach(x: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def record(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    layers: dict[str, nn.Module] | None = None,
    *,
    clone_outputs: bool = False,
) -> Recording:
    """One forward and one backward pass recording activations and output gradients.

    Args:
        model: a hookable model (see :mod:`gradsift.layers`).
        loss_fn: ``(outputs, targets) -> [B]`` per-example losses.
        inputs: ``[B, ...]``.
        targets: ``[B, ...]``.
        layers: the layers to record (default :func:`hooked_layers`).
        clone_outputs: hand the network a copy of each layer output. Needed only when
            the model modifies a layer output in place (``ReLU(inplace=True)``); without
            it, such a pass is detected and repeated with copies.

    Raises:
        NotHookable: a trainable parameter is used outside its layer, or a layer does not
            see the batch on axis 0.
    """
    layers = hooked_layers(model) if layers is None else layers
    batch = int(inputs.shape[0])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    guard = _ParameterUseGuard(trainable)
    captures = {name: Capture(m) for name, m in layers.items()}
    bad_batch: list[str] = []
    versions: list[tuple[Tensor, int]] = []

    def pre_hook(module, args):
        guard.depth += 1

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            guard.depth -= 1
            a = args[0] if args else None
            if (
                not isinstance(a, Tensor) or not isinstance(output, Tensor)
                or a.shape[:1] != (batch,) or output.shape[:1] != (batch,)
            ):
                bad_batch.append(name)
                return None
            cap = captures[name]
            cap.inputs.append(a.detach())
            cap.args.append(_detach(tuple(args)))
            cap.kwargs.append(_detach(dict(kwargs)))
            cap.outputs.append(output)
            versions.append((output, output._version))
            return output.clone() if clone_outputs and output.requires_grad else None

        return hook

    handles = []
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(make_hook(name), with_kwargs=True))
        with torch.enable_grad(), guard:
            outputs = model(inputs)
            losses = loss_fn(outputs, targets)
    finally:
        for h in handles:
            h.remove()
    if guard.violation is not None:
        raise NotHookable(
            f"a trainable parameter is used outside its layer's forward ({guard.violation})"
        )
    if bad_batch:
        raise NotHookable(f"layer(s) {sorted(set(bad_batch))} do not see the batch on axis 0")
    if not clone_outputs and any(t._version != v for t, v in versions):
        # A layer output was changed in place; its gradient must be taken before that.
        return record(model, loss_fn, inputs, targets, layers, clone_outputs=True)
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [B]=[{batch}]); got shape "
            f"{tuple(getattr(losses, 'shape', ()))}. Use reduction='none'."
        )
    flat = [(c, o) for c in captures.values() for o in c.outputs if o.requires_grad]
    if flat:
        grads = torch.autograd.grad(losses.sum(), [o for _, o in flat], allow_unused=True)
        for (cap, out), g in zip(flat, grads):
            cap.grad_outputs.append(torch.zeros_like(out) if g is None else g.detach())
    for cap in captures.values():
        # Calls whose output needed no gradient contribute nothing.
        keep = [o.requires_grad for o in cap.outputs]
        cap.inputs = [a for a, k in zip(cap.inputs, keep) if k]
        cap.args = [a for a, k in zip(cap.args, keep) if k]
        cap.kwargs = [a for a, k in zip(cap.kwargs, keep) if k]
        cap.outputs = []
    return Recording(losses.detach(), _detach(outputs), captures)
