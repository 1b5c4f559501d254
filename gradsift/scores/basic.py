"""Scores computed from one model (or a pair of models) at one point in time.

All functions are pure: ``(model(s), data) -> [N]`` arrays, no hidden state.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import per_example_norms

LossFn = Callable[[Tensor, Tensor], Tensor]


def _ce() -> LossFn:
    return nn.CrossEntropyLoss(reduction="none")


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, batch_size: int = 4096) -> Tensor:
    """``model(x)`` in eval mode, in batches: ``[N, C]``."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]) if len(x) else x.new_zeros((0,))
    model.train(was)
    return out


def el2n(outputs: Tensor, targets: Tensor) -> Tensor:
    """EL2N (Data Diet): ``||softmax(outputs_i) - onehot(y_i)||_2``.

    Args:
        outputs: ``[N, C]`` logits; targets: ``[N]`` labels.

    Returns:
        ``[N]``, in ``[0, sqrt(2)]``; high = hard or mislabeled.
    """
    p = outputs.softmax(-1)
    return (p - F.one_hot(targets, p.shape[-1]).to(p.dtype)).norm(dim=-1)


def margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """Probability margin ``p_y - max_{k != y} p_k``: ``[N]`` in ``[-1, 1]`` (low = suspect)."""
    p = outputs.softmax(-1)
    py = p.gather(1, targets[:, None]).squeeze(1)
    other = p.scatter(1, targets[:, None], float("-inf")).amax(1)
    return py - other


def losses(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """Per-example loss ``[N]`` of ``model`` (eval mode)."""
    return (loss_fn or _ce())(logits(model, x), y)


def grand(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None,
          chunk_size: int = 256) -> Tensor:
    """GraNd (Data Diet): per-example gradient norm ``||grad_theta loss(x_i, y_i)||_2``: ``[N]``."""
    was = model.training
    model.eval()
    try:
        return torch.cat([
            per_example_norms(model, loss_fn or _ce(), x[s : s + chunk_size], y[s : s + chunk_size])
            for s in range(0, len(x), chunk_size)
        ])
    finally:
        model.train(was)


def color_filter_scores(prior: nn.Module, conditioned: nn.Module, x: Tensor, y: Tensor,
                        loss_fn: LossFn | None = None) -> Tensor:
    """CoLoR-Filter: ``loss_prior(x_i) - loss_conditioned(x_i)``: ``[N]``.

    ``conditioned`` is ``prior`` fine-tuned on a small target set; a high score means the
    target data made the example more likely, i.e. it is useful for the target task.
    """
    return losses(prior, x, y, loss_fn) - losses(conditioned, x, y, loss_fn)


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (in module registration order)."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("model has no nn.Linear layer to take a penultimate embedding from")
    return found[-1]


@torch.no_grad()
def penultimate_embeddings(model: nn.Module, x: Tensor, layer: nn.Module | None = None,
                           batch_size: int = 4096) -> Tensor:
    """Inputs of the classifier layer (default: the last ``nn.Linear``): ``[N, D]``."""
    layer = layer or last_linear(model)
    captured: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1)))
    try:
        logits(model, x, batch_size)
    finally:
        handle.remove()
    return torch.cat(captured)


def prototype_distance(embeddings: np.ndarray | Tensor, labels: np.ndarray | Tensor, *,
                       clusters_per_class: int = 1, seed: int = 0) -> np.ndarray:
    """Distance to the nearest k-means centroid of the example's own class
    ("Beyond neural scaling laws"): ``[N]``; far = hard/atypical.

    Args:
        embeddings: ``[N, D]`` (e.g. :func:`penultimate_embeddings`).
        labels: ``[N]`` class of each example.
        clusters_per_class: k of k-means within each class (lowered to the class size).
        seed: k-means initialization.
    """
    from sklearn.cluster import KMeans

    e = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, Tensor) else embeddings, dtype=np.float64)
    lab = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    out = np.zeros(len(lab))
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        k = min(clusters_per_class, len(idx))
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(e[idx])
        out[idx] = km.transform(e[idx]).min(1)
    return out
