"""Per-example losses, gradients and gradient norms for any ``nn.Module``.

Two paths compute the same thing (``method=``):

* ``"hooks"`` (:mod:`gradsift.layers`): one batched forward and backward pass; layer
  activations and output gradients give each supported layer's per-example gradients in
  closed form (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, RMSNorm), and norms by
  ghost norms without forming the gradients.
* ``"vmap"``: :mod:`torch.func`; the model is called as a pure function of its parameters
  (``functional_call``) and ``vmap(grad_and_value(...))`` maps the single-example gradient
  over the batch. Works for any module.
* ``"auto"`` (default): hooks when every trainable parameter belongs to a supported layer
  (and is used only in that layer's ``forward``), otherwise torch.func for the *whole*
  model. Both give the same gradients up to float rounding.

The batch is processed in chunks so that the per-example memory stays under a bound.
:func:`gradsift.aggregate.aggregated_gradient` goes further: it reduces each layer's
per-example gradients as soon as they exist, so the full ``B x P`` matrix is never held.

Conventions
-----------
* ``inputs`` is a tensor (``model(x)``), a tuple (``model(*x)``) or a dict
  (``model(**x)``, e.g. a tokenizer's batch); every tensor in it has the batch on dim 0.
* ``loss_fn(outputs, targets)`` receives the model's output as it is (a tensor, a tuple,
  a HuggingFace ``ModelOutput``) and returns *per-example* losses of shape ``[B]``
  (e.g. ``nn.CrossEntropyLoss(reduction="none")``, or :mod:`gradsift.losses`).
* Per-example gradients are a ``dict`` mapping parameter name to a tensor of shape
  ``[B, *param.shape]``. Parameters with ``requires_grad=False`` are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import layers
from .errors import UnsupportedModelError
from .inputs import Inputs, batch_size, call_model, select, split_tensors
from .workspace import Workspace, acquire_set

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Tensor], Tensor]
Grads = dict[str, Tensor]
Method = Literal["auto", "hooks", "vmap"]
METHODS = ("auto", "hooks", "vmap")

#: Default bound, in bytes, on the per-example gradient memory of one chunk.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class PerExample:
    """Result of one per-example pass.

    Attributes:
        losses: ``[B]`` per-example losses (detached).
        grads: name -> ``[B, *param.shape]`` per-example gradients (detached).
        outputs: the model's outputs (detached; ``[B, ...]`` for a tensor-valued model).
    """

    losses: Tensor
    grads: Grads
    outputs: Any


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Parameters with ``requires_grad=True``, by name (as in ``named_parameters``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_per_example_safe(model: nn.Module) -> None:
    """Refuse models whose forward pass mixes examples of a batch.

    BatchNorm in training mode normalizes each example with statistics of the whole
    batch, so an example's "gradient" depends on the others and per-example
    gradients (and any guarantee built on them, such as DP) are not defined.

    Raises:
        UnsupportedModelError: naming the offending layer and the fix.
    """
    for name, module in model.named_modules():
        if not module.training:
            continue
        label = f"layer '{name or type(module).__name__}' ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(
                f"{label} mixes examples of a batch in training mode, so per-example gradients "
                "are not defined. Replace it with nn.GroupNorm or nn.LayerNorm, or put it in eval "
                "mode (module.eval()) so that it uses its running statistics."
            )
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise UnsupportedModelError(
                f"{label} updates running statistics from the whole batch in training mode, so "
                "per-example gradients are not defined. Create it with track_running_stats=False, "
                "or put it in eval mode (module.eval()) so that it uses its running statistics."
            )


def _check_batch(inputs: Inputs, targets: Tensor) -> int:
    return batch_size(inputs, targets)


def auto_chunk_size(model: nn.Module, batch_size: int, max_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Largest chunk whose per-example gradients fit in ``max_bytes`` (at least 1)."""
    params = trainable_parameters(model)
    per_example_bytes = sum(p.numel() * p.element_size() for p in params.values())
    if per_example_bytes == 0:
        return max(batch_size, 1)
    # vmap keeps about two copies of the per-example gradients alive (grad + output).
    return int(max(1, min(batch_size, max_bytes // (2 * per_example_bytes))))


def _functional(model: nn.Module, params: dict[str, Tensor], x: Inputs) -> Any:
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


def _single_loss_fn(model: nn.Module, loss_fn: LossFn, frozen: dict[str, Tensor], rebuild, spec: dict):
    """``(params, *example tensors, target) -> (loss, output tensors)`` for one example.

    The structure of the model's output is left in ``spec["out"]``.
    """

    def single(params: dict[str, Tensor], *xs_and_y: Tensor):
        *xs, y = xs_and_y
        out = _functional(model, {**frozen, **params}, rebuild([t.unsqueeze(0) for t in xs]))
        loss = loss_fn(out, y.unsqueeze(0))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                "loss_fn must return one loss per example (shape [B]); got shape "
                f"{tuple(getattr(loss, 'shape', ()))} for a batch of 1. Use reduction='none'."
            )
        leaves, spec["out"] = tree_flatten(out)
        spec["kinds"] = [isinstance(v, Tensor) for v in leaves]
        return loss.reshape(()), [t.squeeze(0) for t in leaves if isinstance(t, Tensor)]

    return single


def _rebuild_outputs(spec: dict, parts: list[Tensor]) -> Any:
    """Put the batched output tensors back into the structure of the model's output."""
    it = iter(parts)
    return tree_unflatten([next(it) if k else None for k in spec["kinds"]], spec["out"])


def resolve_method(model: nn.Module, method: str) -> str:
    """The path ``"hooks"`` or ``"vmap"`` that ``method`` means for ``model`` (``"auto"``:
    hooks when every trainable layer has a rule). Raises for an unknown method, or for
    ``"hooks"`` on a model with unsupported layers."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        bad = layers.unsupported_layers(model)
        if bad:
            log.debug("gradsift: torch.func path: no layer rule for %s", bad)
            return "vmap"
        return "hooks"
    if method == "hooks":
        layers.check_hookable(model)
    return method


def _fallback(err: Exception, method: str) -> str:
    """The hooks path refused a batch: re-raise for ``method="hooks"``, else log why (and
    return it, for the error torch.func may raise next)."""
    if method == "hooks":
        raise err
    log.debug("gradsift: torch.func path: the hooks path refused this batch: %s", err)
    return str(err)


def _chunks(batch_size: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(s, s + chunk_size) for s in range(0, batch_size, chunk_size)]


def _cat(parts: list[Any]) -> Any:
    """Concatenate per-chunk results along the batch (tensors, or structures of tensors)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    leaves = [tree_flatten(p) for p in parts]
    spec = leaves[0][1]
    cols = zip(*[lv for lv, _ in leaves])
    return tree_unflatten(
        [torch.cat(list(c)) if isinstance(c[0], Tensor) else c[0] for c in cols], spec
    )


def per_example(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
    method: Method = "auto",
    workspace: Workspace | None = None,
) -> PerExample:
    """Per-example losses, gradients and outputs in one pass.

    Args:
        model: any module; its parameters with ``requires_grad=False`` are held fixed.
        loss_fn: ``(outputs, targets [B, ...]) -> [B]`` per-example losses; ``outputs`` is
            what the model returns (tensor, tuple, ``ModelOutput``).
        inputs: ``[B, ...]``, or a tuple (``model(*inputs)``) or dict (``model(**inputs)``)
            of tensors with the batch on dim 0.
        targets: ``[B, ...]``.
        chunk_size: examples per pass; ``None`` picks one from a memory bound
            (:data:`DEFAULT_CHUNK_BYTES`).
        method: ``"auto"`` (hooks where every trainable layer has a rule and the batch
            trace succeeds, else torch.func; see :func:`gradsift.layers.explain`), ``"hooks"`` (raise if
            not possible) or ``"vmap"`` (torch.func).
        workspace: a :class:`gradsift.workspace.Workspace` to write the gradients into
            (hooks path): the next call with it *overwrites* them. By default the
            gradients are views of a pooled buffer that is reused only once nothing holds
            them (see :mod:`gradsift.workspace`), so results you keep are never overwritten.

    Returns:
        :class:`PerExample` with ``losses [B]``, ``grads name -> [B, *shape]``, ``outputs``.
    """
    check_per_example_safe(model)
    batch = _check_batch(inputs, targets)
    resolved = resolve_method(model, method)
    refused: str | None = None
    if resolved == "hooks" and batch > 0:
        # The hook path holds no per-example intermediates beyond its result, so it runs
        # the batch whole unless asked to chunk; each chunk writes its rows of the result.
        chunk_size = batch if chunk_size is None else chunk_size
        grads = result_buffers(model, batch, workspace)
        try:
            parts = [
                layers.hook_per_example(model, loss_fn, select(inputs, s), targets[s],
                                        out={n: g[s] for n, g in grads.items()})
                for s in _chunks(batch, chunk_size)
            ]
        except layers.NotHookable as err:
            del grads
            refused = _fallback(err, method)
        else:
            return PerExample(
                losses=_cat([p[0] for p in parts]),
                grads=grads,
                outputs=_cat([p[2] for p in parts]),
            )
    return _vmap_per_example(model, loss_fn, inputs, targets, chunk_size=chunk_size,
                             refused=refused)


def result_buffers(model: nn.Module, batch: int, workspace: Workspace | None = None) -> Grads:
    """Uninitialized per-example gradient tensors name -> ``[B, *param.shape]`` (contiguous,
    one storage each): from ``workspace`` when given (previous results in it are
    overwritten), else from the :mod:`gradsift.workspace` pool (a set no caller holds any
    more, so results a caller keeps are never overwritten)."""
    specs = {n: ((batch, *p.shape), p.dtype, p.device) for n, p in trainable_parameters(model).items()}
    if workspace is not None:
        return workspace.take_set(specs)
    return acquire_set(specs)


def _vmap_per_example(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
    refused: str | None = None,
) -> PerExample:
    """torch.func path of :func:`per_example` (``refused``: why the hooks path refused the
    batch, for the error if torch.func fails too)."""
    batch = _check_batch(inputs, targets)
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b for n, b in model.named_buffers()})
    if batch == 0:
        empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        return PerExample(targets.new_zeros((0,), dtype=torch.get_default_dtype()), empty, targets.new_zeros((0,), dtype=torch.get_default_dtype()))
    if chunk_size is None:
        chunk_size = auto_chunk_size(model, batch)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tensors, rebuild = split_tensors(inputs)
    spec: dict = {}
    single = _single_loss_fn(model, loss_fn, frozen, rebuild, spec)
    mapped = vmap(
        grad_and_value(single, has_aux=True), in_dims=(None, *[0] * (len(tensors) + 1)),
        randomness="different",
    )
    losses, outputs, grads = [], [], {n: [] for n in params}
    for start in range(0, batch, chunk_size):
        xs = [t[start : start + chunk_size] for t in tensors]
        y = targets[start : start + chunk_size]
        try:
            g, (loss, out) = mapped(params, *xs, y)
        except (RuntimeError, NotImplementedError) as err:
            raise _torch_func_error(model, err, refused) from err
        losses.append(loss.detach())
        outputs.append(_rebuild_outputs(spec, [o.detach() for o in out]))
        for n in params:
            grads[n].append(g[n].detach())
    return PerExample(
        losses=torch.cat(losses),
        grads={n: torch.cat(v) if len(v) > 1 else v[0] for n, v in grads.items()},
        outputs=_cat(outputs),
    )


def _torch_func_error(model: nn.Module, err: Exception, refused: str | None = None) -> UnsupportedModelError:
    """A gradsift error for a model torch.func cannot map over, naming what to do (and,
    when the hooks path refused the batch first, the layer and why)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    bad = layers.unsupported_layers(model)
    hint = (
        f"The fast hooks path has no layer rule for {bad}: register one with "
        "gradsift.layers.register_layer_rule (see gradsift.layers), or replace those layers."
        if bad else
        f"The hooks path refused this batch: {refused}." if refused else
        "Run gradsift.layers.explain(model, loss_fn, inputs, targets) to see why the hooks "
        "path refused this model."
    )
    if "data-dependent control flow" in first or "data dependent" in first:
        what = "the model branches on tensor values (Python if/while on a tensor)"
    elif "in-place" in first.lower() or "inplace" in first.lower():
        what = "the model writes in place into a tensor that does not depend on the example"
    else:
        what = first
    return UnsupportedModelError(
        f"torch.func (vmap) cannot compute per-example gradients for {type(model).__name__}: "
        f"{what}. {hint}"
    )


def per_example_losses(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor) -> Tensor:
    """Per-example losses ``[B]`` (no gradients are computed)."""
    batch = _check_batch(inputs, targets)
    with torch.no_grad():
        losses = loss_fn(call_model(model, inputs), targets)
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape [B]={batch}, got "
            f"{tuple(getattr(losses, 'shape', ()))}. Use reduction='none'."
        )
    return losses


def per_example_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
    method: Method = "auto",
    workspace: Workspace | None = None,
) -> Grads:
    """Per-example gradients: parameter name -> ``[B, *param.shape]`` (arguments as :func:`per_example`)."""
    return per_example(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method,
                       workspace=workspace).grads


def grad_norms(grads: Grads, *, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
    """L2 norms of per-example gradients.

    Args:
        grads: name -> ``[B, *shape]``.
        per_layer: return name -> ``[B]`` instead of the total ``[B]``.
    """
    if not grads:
        raise ValueError("no gradients given")
    return _norms_from_squares(_squared_norms(grads), per_layer=per_layer)


def _squared_norms(grads: Grads) -> dict[str, Tensor]:
    """name -> ``[B]`` squared L2 norm of each example's gradient of that parameter."""
    return {n: (g.flatten(1) if g.ndim > 1 else g.unsqueeze(1)).square().sum(1) for n, g in grads.items()}


def _detach(x: Any) -> Any:
    leaves, spec = tree_flatten(x)
    return tree_unflatten([v.detach() if isinstance(v, Tensor) else v for v in leaves], spec)


def _norms_from_squares(sq: dict[str, Tensor], *, per_layer: bool) -> Tensor | dict[str, Tensor]:
    """Squared per-example norms name -> ``[B]`` to norms per layer, or the total ``[B]``."""
    if per_layer:
        return {n: v.sqrt() for n, v in sq.items()}
    return torch.stack(list(sq.values())).sum(0).sqrt()


def per_example_norms(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    per_layer: bool = False,
    chunk_size: int | None = None,
    method: Method = "auto",
) -> Tensor | dict[str, Tensor]:
    """Per-example gradient L2 norms, total ``[B]`` or per parameter (name -> ``[B]``).

    With hooks (see :func:`per_example`), Linear/Conv/Embedding norms are ghost norms:
    computed from activations and output gradients without forming per-example
    gradients (one forward and one backward pass). With torch.func, gradients are
    computed chunk by chunk and reduced to norms at once, so the full ``B x P`` matrix
    never exists.
    """
    check_per_example_safe(model)
    batch = _check_batch(inputs, targets)
    resolved = resolve_method(model, method)
    refused: str | None = None
    if resolved == "hooks" and batch > 0:
        try:
            _, sq, _ = layers.hook_norms_sq(model, loss_fn, inputs, targets)
        except layers.NotHookable as err:
            refused = _fallback(err, method)
        else:
            return _norms_from_squares(sq, per_layer=per_layer)
    if chunk_size is None:
        chunk_size = auto_chunk_size(model, batch)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts: list[dict[str, Tensor]] = []
    for start in range(0, max(batch, 1), chunk_size):
        s = slice(start, start + chunk_size)
        g = _vmap_per_example(model, loss_fn, select(inputs, s), targets[s], chunk_size=chunk_size,
                              refused=refused).grads
        parts.append(_squared_norms(g))
    sq = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    return _norms_from_squares(sq, per_layer=per_layer)


def batch_gradient(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor) -> tuple[Grads, Tensor, Any]:
    """Mean-loss gradient by one ordinary backward pass.

    Returns:
        (name -> ``param.shape`` gradient of the mean loss, per-example losses ``[B]``,
        outputs ``[B, ...]``), all detached.
    """
    params = trainable_parameters(model)
    outputs = call_model(model, inputs)
    losses = loss_fn(outputs, targets)
    g = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
    grads = {n: (gi if gi is not None else torch.zeros_like(p)) for (n, p), gi in zip(params.items(), g)}
    return grads, losses.detach(), _detach(outputs)
