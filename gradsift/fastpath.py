"""Per-example gradients, norms and weighted sums from layer hooks.

One ordinary forward pass records, for every *supported* layer, its input activation
``a`` and (after one backward pass over ``sum_i loss_i``) the gradient ``d`` of the
summed loss with respect to its output. Because examples do not interact, row ``i`` of
``d`` is the gradient of ``loss_i`` alone, and each layer's per-example parameter
gradients follow in closed form (Goodfellow 2015; Opacus; BackPACK):

=============  ==========================================================================
layer          per-example gradient of example ``i``
=============  ==========================================================================
Linear         ``sum_t d_it a_it^T`` (``t`` over extra axes, e.g. a sequence ``[B, T, d]``)
Conv1d/2d      the same over unfolded input patches (``F.unfold``), per group
Embedding      ``d_it`` added to the row of token ``idx_it`` (``padding_idx`` stays 0)
LayerNorm,     ``sum_t d_it * xhat_it`` (weight) and ``sum_t d_it`` (bias), ``xhat`` the
GroupNorm,     normalized input
RMSNorm
=============  ==========================================================================

The backward pass asks autograd only for the gradients with respect to layer outputs, so
the (unneeded) batch gradients of the weights are never computed.

Ghost norms (Li et al., "Large Language Models Can Be Strong Differentially Private
Learners"): for Linear/Conv the squared norm of ``sum_t d_t a_t^T`` is
``<A A^T, D D^T>_F`` (for one position: ``||a||^2 ||d||^2``), computed without the
``[out, in]`` matrix when that is cheaper (``T^2 (in + out) < T in out``).

A model is *hookable* when every trainable parameter belongs directly to a layer of a
supported type (exact type, not a subclass, which may change ``forward``), each such
layer sees the batch on axis 0, and no trainable parameter is used outside its layer's
``forward`` (checked while the forward pass runs). :func:`unsupported_layers` says which
layers block it; :mod:`gradsift.engine` then falls back to :mod:`torch.func` for the
whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import UnsupportedModelError

LossFn = Callable[[Tensor, Tensor], Tensor]
Grads = dict[str, Tensor]

SUPPORTED: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)


class NotHookable(UnsupportedModelError):
    """The model (or this batch) cannot use the hook path; use the torch.func path."""


# ---------------------------------------------------------------- which layers

def _own_trainable(module: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _supported(module: nn.Module) -> bool:
    if type(module) not in SUPPORTED:
        return False
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode not in (
        "zeros", "reflect", "replicate", "circular"
    ):
        return False
    return True


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names of modules that own trainable parameters but have no hook rule."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if _own_trainable(m) and not _supported(m)
    ]


def hooked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Supported modules owning trainable parameters, by module name."""
    return {name: m for name, m in model.named_modules() if _own_trainable(m) and _supported(m)}


# ---------------------------------------------------------------- capture

@dataclass
class Capture:
    """What one forward/backward pass recorded for one layer (over all its calls).

    Attributes:
        module: the layer.
        inputs: per call, the input activation ``[B, ...]`` (detached).
        outputs: per call, the output ``[B, ...]`` (in the autograd graph).
        grad_outputs: per call, ``d sum_i loss_i / d output`` ``[B, ...]``.
    """

    module: nn.Module
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grad_outputs: list[Tensor] = field(default_factory=list)


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
    """Result of :func:`record`: per-example losses, outputs and layer captures."""

    losses: Tensor
    outputs: Tensor
    captures: dict[str, Capture]


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
        model: a hookable model (see module docs).
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
        def hook(module, args, output):
            guard.depth -= 1
            a = args[0]
            if not isinstance(output, Tensor) or a.shape[:1] != (batch,) or output.shape[:1] != (batch,):
                bad_batch.append(name)
                return None
            cap = captures[name]
            cap.inputs.append(a.detach())
            cap.outputs.append(output)
            versions.append((output, output._version))
            return output.clone() if clone_outputs and output.requires_grad else None

        return hook

    handles = []
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(make_hook(name)))
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
    if losses.shape != (batch,):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [B]=[{batch}]); got shape "
            f"{tuple(losses.shape)}. Use reduction='none'."
        )
    flat = [(c, o) for c in captures.values() for o in c.outputs if o.requires_grad]
    if flat:
        grads = torch.autograd.grad(losses.sum(), [o for _, o in flat], allow_unused=True)
        for (cap, out), g in zip(flat, grads):
            cap.grad_outputs.append(torch.zeros_like(out) if g is None else g.detach())
    for cap in captures.values():
        # Calls whose output needed no gradient contribute nothing.
        cap.inputs = [a for a, o in zip(cap.inputs, cap.outputs) if o.requires_grad]
        cap.outputs = []
    return Recording(losses.detach(), outputs.detach(), captures)


# ---------------------------------------------------------------- per-layer rules

def _positions(cap: Capture) -> tuple[Tensor, Tensor] | None:
    """Linear/Conv: all calls as ``A [B, G, T, K]`` and ``D [B, G, T, O]`` (G groups)."""
    m = cap.module
    if not cap.inputs:
        return None
    As, Ds = [], []
    for a, d in zip(cap.inputs, cap.grad_outputs):
        b = a.shape[0]
        if isinstance(m, nn.Linear):
            As.append(a.reshape(b, 1, -1, m.in_features))
            Ds.append(d.reshape(b, 1, -1, m.out_features))
        else:
            A, D = _unfold_conv(m, a, d)
            As.append(A)
            Ds.append(D)
    if len(As) == 1:
        return As[0], Ds[0]
    return torch.cat(As, dim=2), torch.cat(Ds, dim=2)


def _unfold_conv(m: nn.Conv1d | nn.Conv2d, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Input patches ``[B, G, L, C/G*k]`` and output grads ``[B, G, L, O/G]``."""
    b, g = a.shape[0], m.groups
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode=mode)
    if isinstance(m, nn.Conv1d):
        a = a.unsqueeze(2)
        kernel, dil, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
    else:
        kernel, dil, stride = m.kernel_size, m.dilation, m.stride
    patches = F.unfold(a, kernel, dilation=dil, padding=0, stride=stride)  # [B, C*k, L]
    length = patches.shape[-1]
    A = patches.view(b, g, -1, length).transpose(2, 3)
    D = d.reshape(b, g, -1, length).transpose(2, 3)
    return A, D


def _embedding_positions(cap: Capture) -> tuple[Tensor, Tensor] | None:
    """Embedding: all calls as indices ``[B, T]`` and output grads ``[B, T, dim]``."""
    if not cap.inputs:
        return None
    m: nn.Embedding = cap.module  # type: ignore[assignment]
    idx = torch.cat([a.reshape(a.shape[0], -1) for a in cap.inputs], dim=1)
    D = torch.cat([d.reshape(d.shape[0], -1, m.embedding_dim) for d in cap.grad_outputs], dim=1)
    if m.padding_idx is not None:
        D = D * (idx != m.padding_idx).unsqueeze(-1).to(D.dtype)
    return idx, D


def _normalized(m: nn.Module, a: Tensor) -> tuple[Tensor, int]:
    """Normalized input ``xhat`` and the number of trailing axes a parameter spans."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(a, m.normalized_shape, None, None, m.eps), len(m.normalized_shape)
    if isinstance(m, nn.RMSNorm):
        return F.rms_norm(a, m.normalized_shape, None, m.eps), len(m.normalized_shape)
    assert isinstance(m, nn.GroupNorm)
    return F.group_norm(a, m.num_groups, None, None, m.eps), -1


def _norm_layer_grads(cap: Capture) -> Grads:
    """LayerNorm/GroupNorm/RMSNorm per-example ``weight``/``bias`` grads, summed over calls."""
    m = cap.module
    own = _own_trainable(m)
    out: Grads = {}
    for a, d in zip(cap.inputs, cap.grad_outputs):
        b = a.shape[0]
        xhat, span = _normalized(m, a)
        terms = {}
        if "weight" in own:
            terms["weight"] = d * xhat
        if "bias" in own:
            terms["bias"] = d
        for n, t in terms.items():
            if span == -1:  # GroupNorm: channel axis 1
                g = t.reshape(b, t.shape[1], -1).sum(-1)
            else:
                g = t.reshape(b, -1, *own[n].shape).sum(1)
            out[n] = out[n] + g if n in out else g
    return out


def layer_grads(cap: Capture) -> Grads:
    """Per-example gradients of one layer's own trainable parameters.

    Returns:
        local parameter name (``"weight"``, ``"bias"``) -> ``[B, *param.shape]``.
    """
    m = cap.module
    own = _own_trainable(m)
    if not cap.inputs:
        return {}
    if isinstance(m, nn.Embedding):
        idx, D = _embedding_positions(cap)  # type: ignore[misc]
        b, v = idx.shape[0], m.num_embeddings
        flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
        g = D.new_zeros(b * v, m.embedding_dim).index_add_(0, flat, D.reshape(-1, m.embedding_dim))
        return {"weight": g.view(b, v, m.embedding_dim)}
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return _norm_layer_grads(cap)
    A, D = _positions(cap)  # type: ignore[misc]
    out: Grads = {}
    if "weight" in own:
        # [B, G, O/G, K] -> weight shape [O, C/G, *k]
        g = torch.matmul(D.transpose(2, 3), A)
        out["weight"] = g.reshape(g.shape[0], *own["weight"].shape)
    if "bias" in own:
        out["bias"] = D.sum(2).reshape(D.shape[0], -1)
    return out


def layer_weighted_sum(cap: Capture, weights: Tensor) -> Grads:
    """``sum_i weights_i * g_i`` of one layer's per-example gradients, never forming them.

    Args:
        weights: ``[B]``.

    Returns:
        local parameter name -> ``param.shape``.
    """
    m = cap.module
    own = _own_trainable(m)
    if not cap.inputs:
        return {}
    if isinstance(m, nn.Embedding):
        idx, D = _embedding_positions(cap)  # type: ignore[misc]
        Dw = (D * weights.view(-1, 1, 1)).reshape(-1, m.embedding_dim)
        return {"weight": D.new_zeros(m.num_embeddings, m.embedding_dim).index_add_(0, idx.reshape(-1), Dw)}
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return {
            n: torch.tensordot(weights.to(g.dtype), g, dims=1)
            for n, g in _norm_layer_grads(cap).items()
        }
    A, D = _positions(cap)  # type: ignore[misc]
    Dw = D * weights.view(-1, 1, 1, 1).to(D.dtype)
    out: Grads = {}
    if "weight" in own:
        # sum over batch and positions, per group: [G, O/G, K]
        g = torch.einsum("bgto,bgtk->gok", Dw, A)
        out["weight"] = g.reshape(own["weight"].shape)
    if "bias" in own:
        out["bias"] = Dw.sum((0, 2)).reshape(-1)
    return out


def layer_norms_sq(cap: Capture) -> Grads:
    """Squared L2 norms of one layer's per-example gradients, by ghost norms where cheaper.

    Returns:
        local parameter name -> ``[B]``.
    """
    m = cap.module
    own = _own_trainable(m)
    if not cap.inputs:
        return {}
    if isinstance(m, nn.Embedding):
        idx, D = _embedding_positions(cap)  # type: ignore[misc]
        t = idx.shape[1]
        if t * t < m.num_embeddings:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(D.dtype)
            return {"weight": (same * (D @ D.transpose(1, 2))).sum((1, 2))}
        return {n: g.flatten(1).square().sum(1) for n, g in layer_grads(cap).items()}
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return {n: g.flatten(1).square().sum(1) for n, g in layer_grads(cap).items()}
    A, D = _positions(cap)  # type: ignore[misc]
    out: Grads = {}
    if "weight" in own:
        t, k, o = A.shape[2], A.shape[3], D.shape[3]
        if t == 1:
            out["weight"] = (A.square().sum((2, 3)) * D.square().sum((2, 3))).sum(1)
        elif t * (k + o) < k * o:
            gram_a = A @ A.transpose(2, 3)  # [B, G, T, T]
            gram_d = D @ D.transpose(2, 3)
            out["weight"] = (gram_a * gram_d).sum((1, 2, 3))
        else:
            out["weight"] = torch.matmul(D.transpose(2, 3), A).square().sum((1, 2, 3))
    if "bias" in own:
        out["bias"] = D.sum(2).square().sum((1, 2))
    return out


# ---------------------------------------------------------------- whole model

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
        for local, p in _own_trainable(m).items():
            out[(lname, local)] = first[id(p)]
    return out


def iter_layer_results(
    model: nn.Module, rec: Recording, fn: Callable[[Capture], Grads]
) -> Iterator[tuple[str, Tensor]]:
    """Apply a per-layer rule and yield ``(parameter name, result)``, layer by layer."""
    names = parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    for lname, cap in rec.captures.items():
        for local, value in fn(cap).items():
            yield names[(lname, local)], value


def _accumulate(target: Grads, name: str, value: Tensor) -> None:
    target[name] = target[name] + value if name in target else value


def check_hookable(model: nn.Module) -> None:
    """Raise :class:`NotHookable` naming the layers without a hook rule."""
    bad = unsupported_layers(model)
    if bad:
        raise NotHookable(
            f"layer(s) {bad} own trainable parameters but have no hook rule (supported: "
            f"{', '.join(t.__name__ for t in SUPPORTED)}); use method='vmap' or 'auto'"
        )


def hook_per_example(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> tuple[Tensor, Grads, Tensor]:
    """Per-example ``(losses [B], grads name -> [B, *shape], outputs [B, ...])`` by hooks."""
    check_hookable(model)
    rec = record(model, loss_fn, inputs, targets)
    grads: Grads = {}
    for name, g in iter_layer_results(model, rec, layer_grads):
        _accumulate(grads, name, g)
    b = inputs.shape[0]
    for n, p in model.named_parameters():
        if p.requires_grad and n not in grads:
            grads[n] = p.new_zeros((b, *p.shape))
    return rec.losses, grads, rec.outputs


def hook_norms_sq(
    model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor
) -> tuple[Tensor, Grads, Tensor]:
    """Per-example ``(losses [B], squared norms name -> [B], outputs)`` by ghost norms.

    A parameter shared by several layers has its per-example gradient materialized
    (the norm of a sum is not the sum of norms).
    """
    check_hookable(model)
    rec = record(model, loss_fn, inputs, targets)
    return rec.losses, recording_norms_sq(model, rec), rec.outputs


def recording_norms_sq(model: nn.Module, rec: Recording) -> Grads:
    """Squared per-example norms (name -> ``[B]``) from a recording."""
    layers = {n: c.module for n, c in rec.captures.items()}
    names = parameter_names(model, layers)
    uses: dict[str, int] = {}
    for v in names.values():
        uses[v] = uses.get(v, 0) + 1
    shared = {v for v, k in uses.items() if k > 1}
    out: Grads = {}
    shared_grads: Grads = {}
    for lname, cap in rec.captures.items():
        own = {names[(lname, local)] for local in _own_trainable(cap.module)}
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


#: Elements of one per-example gradient block in :func:`layer_reduced` (4 MB of float32).
BLOCK_ELEMENTS = 1 << 20


def layer_reduced(
    cap: Capture,
    reducer: Callable[[Tensor], Tensor],
    factors: Callable[[str], Tensor | None],
) -> Grads | None:
    """Per-coordinate reduction of one layer's per-example gradients, block by block.

    For Linear/Conv the per-example weight gradients are formed a block of output
    channels at a time (about :data:`BLOCK_ELEMENTS` values, so the block stays in cache
    and no ``B x layer`` tensor is ever allocated) and reduced at once; other layers form
    their (small) per-example gradients whole.

    Args:
        reducer: ``[B, ...] -> [...]`` acting on each coordinate independently.
        factors: local parameter name -> per-example scale ``[B]`` (clipping) or ``None``.

    Returns:
        local name -> ``param.shape``, or ``None`` if a per-example gradient is not finite.
    """
    m = cap.module
    if not cap.inputs:
        return {}
    if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        out: Grads = {}
        for local, g in layer_grads(cap).items():
            f = factors(local)
            if f is not None:
                g = g * f.view(-1, *([1] * (g.ndim - 1)))
            if not bool(torch.isfinite(g.sum())):
                return None
            out[local] = reducer(g)
        return out
    own = _own_trainable(m)
    A, D = _positions(cap)  # type: ignore[misc]
    b, groups, _, k = A.shape
    o = D.shape[3]
    out = {}
    if "weight" in own:
        f = factors("weight")
        Dw = D if f is None else D * f.view(-1, 1, 1, 1).to(D.dtype)
        w = D.new_empty(groups, o, k)
        rows = max(1, BLOCK_ELEMENTS // max(1, b * groups * k))
        for start in range(0, o, rows):
            g = torch.matmul(Dw[..., start : start + rows].transpose(2, 3), A)  # [B, G, r, K]
            if not bool(torch.isfinite(g.sum())):
                return None
            w[:, start : start + rows] = reducer(g)
        out["weight"] = w.reshape(own["weight"].shape)
    if "bias" in own:
        f = factors("bias")
        g = D.sum(2).reshape(b, -1)
        if f is not None:
            g = g * f.view(-1, 1)
        if not bool(torch.isfinite(g.sum())):
            return None
        out["bias"] = reducer(g)
    return out
