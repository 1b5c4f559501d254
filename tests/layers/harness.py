"""One check for every layer rule and model: per-example gradients and norms from the hooks
path and the torch.func path equal a float64 loop of single-example backward passes."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from gradsift import layers
from gradsift.engine import per_example, per_example_norms


def probe_loss(out: Tensor, t: Tensor) -> Tensor:
    """A nonlinear per-example loss of any output shape: ``[B, ...] -> [B]``."""
    s = (out.flatten(1) * t.flatten(1)).sum(1)
    return s.square() + out.flatten(1).square().sum(1) * 0.1


def _to64(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_to64(v) for v in x)
    if isinstance(x, dict):
        return {k: _to64(v) for k, v in x.items()}
    return x


def _row(x: Any, i: int) -> Any:
    if isinstance(x, Tensor):
        return x[i : i + 1]
    if isinstance(x, tuple):
        return tuple(_row(v, i) for v in x)
    if isinstance(x, dict):
        return {k: _row(v, i) for k, v in x.items()}
    return x


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def loop_reference(model: nn.Module, loss_fn: Callable, x: Any, y: Tensor) -> dict[str, Tensor]:
    """name -> ``[B, *shape]`` per-example gradients by ``B`` single-example backward passes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(len(y)):
        loss = loss_fn(_call(model, _row(x, i)), y[i : i + 1]).sum()
        g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), gi in zip(params.items(), g):
            out[n].append(torch.zeros_like(p) if gi is None else gi.to_dense() if gi.is_sparse else gi)
    return {
        n: torch.stack(v) if v else p.new_zeros((0, *p.shape)) for (n, v), p in zip(out.items(), params.values())
    }


def check_per_example(
    model: nn.Module,
    x: Any,
    targets: Tensor | None = None,
    *,
    loss_fn: Callable = probe_loss,
    methods: Sequence[str] = ("hooks", "vmap"),
    chunk_size: int | None = None,
    atol: float = 1e-8,
) -> dict[str, Tensor]:
    """Assert each method's per-example grads and norms equal the float64 loop's.

    The model and floating inputs are copied to float64, so the tolerance is tight.
    ``method="hooks"`` raises if the model is not hookable, so a hooks check also
    proves that the fast path was taken. ``targets`` default to random tensors shaped
    like the output (for :func:`probe_loss`).

    Returns:
        the loop reference, name -> ``[B, *shape]``.
    """
    model = copy.deepcopy(model).double()
    x = _to64(x)
    if targets is None:
        with torch.no_grad():
            out = _call(model, x)
        targets = torch.randn_like(out)
    targets = _to64(targets)
    ref = loop_reference(model, loss_fn, x, targets)
    ref_total = torch.zeros(len(targets), dtype=torch.float64)
    for g in ref.values():
        ref_total = ref_total + g.flatten(1).square().sum(1)
    for method in methods:
        pe = per_example(model, loss_fn, x, targets, method=method, chunk_size=chunk_size)
        assert set(pe.grads) == set(ref), (method, set(pe.grads) ^ set(ref))
        for n, g in ref.items():
            torch.testing.assert_close(pe.grads[n], g, atol=atol, rtol=1e-6, msg=lambda m: f"{method} {n}: {m}")
        layer = per_example_norms(model, loss_fn, x, targets, method=method, per_layer=True, chunk_size=chunk_size)
        for n, g in ref.items():
            torch.testing.assert_close(
                layer[n], g.flatten(1).norm(dim=1), atol=atol, rtol=1e-6, msg=lambda m: f"{method} norm {n}: {m}"
            )
        total = per_example_norms(model, loss_fn, x, targets, method=method, chunk_size=chunk_size)
        torch.testing.assert_close(total, ref_total.sqrt(), atol=atol, rtol=1e-6)
    if "hooks" in methods and len(targets) > 0:
        check_layer_results(model, loss_fn, x, targets, ref, atol=atol)
    return ref


def check_layer_results(model: nn.Module, loss_fn: Callable, x: Any, targets: Tensor, ref: dict, *,
                        atol: float) -> None:
    """Each rule's :meth:`~gradsift.layers.LayerRule.gram`, norms and
    :meth:`~gradsift.layers.LayerRule.weighted_sum` equal ``G G^T``, ``|g_i|^2`` and
    ``sum_i w_i g_i`` of the loop's gradients (a parameter shared by layers: only the sum of
    its layers' weighted sums)."""
    rec = layers.record(model, loss_fn, x, targets)
    names = layers.parameter_names(model, {n: c.module for n, c in rec.captures.items()})
    counts: dict[str, int] = {}
    for n in names.values():
        counts[n] = counts.get(n, 0) + 1
    w = torch.rand(len(targets), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    summed: dict[str, Tensor] = {}
    for lname, cap in rec.captures.items():
        for local, s in layers.layer_weighted_sum(cap, w).items():
            name = names[(lname, local)]
            summed[name] = summed[name] + s if name in summed else s
        for kind, got, want in (("gram", layers.layer_gram(cap), lambda f: f @ f.T),
                                ("layer norms", layers.layer_norms_sq(cap), lambda f: f.square().sum(1))):
            for local, v in got.items():
                name = names[(lname, local)]
                if counts[name] == 1:
                    torch.testing.assert_close(v, want(ref[name].flatten(1)), atol=atol, rtol=1e-6,
                                               msg=lambda m: f"{kind} {name}: {m}")
    for name, s in summed.items():
        torch.testing.assert_close(s, torch.tensordot(w, ref[name], dims=1), atol=atol, rtol=1e-6,
                                   msg=lambda m: f"weighted sum {name}: {m}")


def check_path(model: nn.Module, x: Any, targets: Tensor | None = None, *, loss_fn: Callable = probe_loss) -> str:
    """The path ``method="auto"`` takes (``"hooks"`` or ``"vmap"``), from :func:`gradsift.layers.explain`."""
    if targets is None:
        with torch.no_grad():
            targets = torch.randn_like(_call(model, x))
    return layers.explain(model, loss_fn, x, targets).method


class SeqFirst(nn.Module):
    """Runs ``layer`` on the sequence-first layout: ``[B, T, ...] -> [T, B, ...] -> layer -> back``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.transpose(0, 1)).transpose(0, 1)
