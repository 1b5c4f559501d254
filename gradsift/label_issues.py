"""Rank training examples by how likely their label is wrong: one call, like cleanlab.

    import gradsift as gs
    train, _ = gs.data.load_digits()
    noisy = gs.data.symmetric_noise(train, 0.2)
    issues = gs.find_label_issues(noisy.x, noisy.y)      # positions, most suspect first
    scores = gs.label_issue_scores(noisy.x, noisy.y)     # [N], higher = more likely mislabeled

How: ``folds``-fold cross-validation with a small model (an MLP by default), all folds
trained at once with ``torch.func`` (:func:`gradsift.ensemble.train_members`).
Every example gets

* out-of-fold signals from the model that never saw it: loss ``-log p_y`` and margin
  ``p_y - max_{k != y} p_k`` (the same predicted probabilities cleanlab is fed), and
* training-dynamics signals from the ``folds - 1`` models that trained on it, read at the
  end of every epoch: cumulative loss and learning time (mislabeled examples are learned
  late, if at all, and keep a high loss: "Towards Memorization Estimation",
  "Weak and Strong Gradient Directions").

The ``combined`` score (default) is the mean of the signals' ranks (each in ``[0, 1]``),
so no signal's scale dominates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .ensemble import member_seed, seeded_factory, train_members_tracked
from .models import mlp
from .scores.dynamics import data_map, learning_time

METHODS = ("combined", "oof_loss", "oof_margin", "cum_loss", "learning_time")


@dataclass
class LabelIssueSignals:
    """Per-example signals behind :func:`label_issue_scores`.

    Attributes:
        pred_probs: ``[N, C]`` out-of-fold predicted probabilities.
        signals: DataFrame with one column per method in :data:`METHODS` (higher = more
            suspect), ``N`` rows in input order.
        models: the ``folds`` trained fold models (model ``f`` never saw fold ``f``).
        fold: ``[N]`` the fold of every example.
        data_map: DataFrame (input order) with the Data Map coordinates ``confidence,
            variability, correctness`` of every example over the epochs of the fold models
            that trained on it (averaged over those models; :mod:`gradsift.datamap`).
    """

    pred_probs: np.ndarray
    signals: pd.DataFrame
    models: list = field(default_factory=list)
    fold: np.ndarray | None = None
    data_map: pd.DataFrame | None = None


def _rank01(v: np.ndarray) -> np.ndarray:
    return (pd.Series(v).rank(method="average").to_numpy() - 1) / max(len(v) - 1, 1)


def _fold_masks(n: int, folds: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Training masks ``[folds, N]`` of equal size (so the folds train in one vmap) and the
    fold of every example ``[N]``."""
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    fold[rng.permutation(n)] = np.arange(n) % folds
    masks = torch.from_numpy(fold[None, :] != np.arange(folds)[:, None])
    size = int(masks.sum(1).min())
    for f in range(folds):  # drop a random example or so from the larger training sets
        extra = int(masks[f].sum()) - size
        if extra:
            masks[f, rng.choice(np.flatnonzero(masks[f].numpy()), extra, replace=False)] = False
    return masks, fold


def label_issue_signals(
    X: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int | None = None,
    model: nn.Module | Callable[[int], nn.Module] | None = None,
    folds: int = 5,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    width: int = 128,
    seed: int = 0,
) -> LabelIssueSignals:
    """Cross-validated signals; see the module docstring and :func:`label_issue_scores`."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float32))
    x = x.reshape(len(x), -1) if model is None else x
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    n = len(yt)
    if n != len(x):
        raise ValueError(f"X and y have different lengths: {len(x)} vs {n}")
    c = int(num_classes or int(yt.max()) + 1)
    if folds < 2 or folds > n:
        raise ValueError(f"folds must be in [2, N={n}], got {folds}")
    model_fn = _model_fn(model, x.shape[1], c, width, seed)
    masks, fold = _fold_masks(n, folds, seed)
    models, hist = train_members_tracked(model_fn, x, yt, masks, epochs=epochs, batch_size=batch_size, lr=lr,
                                    momentum=momentum, weight_decay=weight_decay, seed=seed)
    # hist: [K, T, N, C] eval-mode logits after every epoch
    probs = hist[torch.from_numpy(fold), -1, torch.arange(n)].softmax(-1).numpy()  # out-of-fold, [N, C]
    p_y = probs[np.arange(n), y]
    other = probs.copy()
    other[np.arange(n), y] = -np.inf
    oof_margin = p_y - other.max(1)
    loss = nn.functional.cross_entropy(hist.flatten(0, 2), yt.repeat(hist.shape[0] * hist.shape[1]),
                                       reduction="none").view(hist.shape[:3]).numpy()  # [K, T, N]
    correct = (hist.argmax(-1) == yt).numpy()  # [K, T, N]
    m = masks.numpy()  # [K, N]
    n_in = np.maximum(m.sum(0), 1)
    cum_loss = (loss.sum(1) * m).sum(0) / n_in
    lt = np.stack([learning_time(correct[k]) for k in range(len(m))])
    ltime = (lt * m).sum(0) / n_in
    sig = pd.DataFrame({
        "oof_loss": -np.log(np.clip(p_y, 1e-12, None)), "oof_margin": -oof_margin,
        "cum_loss": cum_loss, "learning_time": ltime.astype(float),
    })
    p_true = hist.softmax(-1).gather(-1, yt.view(1, 1, n, 1).expand(*hist.shape[:3], 1)).squeeze(-1).numpy()  # [K, T, N]
    maps = [data_map(p_true[k], correct[k]) for k in range(len(m))]
    dm = pd.DataFrame({name: (np.stack([mp[j] for mp in maps]) * m).sum(0) / n_in
                       for j, name in enumerate(("confidence", "variability", "correctness"))})
    sig.insert(0, "combined", np.mean([_rank01(sig[k].to_numpy()) for k in sig.columns], axis=0))
    return LabelIssueSignals(pred_probs=probs, signals=sig, models=models, fold=fold, data_map=dm)


def _model_fn(model, in_features: int, num_classes: int, width: int, seed: int) -> Callable[[int], nn.Module]:
    if model is None:
        return seeded_factory(lambda: mlp(in_features, num_classes, width=width, depth=2), seed)
    if isinstance(model, nn.Module):
        def reinit(k: int) -> nn.Module:
            m = copy.deepcopy(model)
            torch.manual_seed(member_seed(seed, k))
            for layer in m.modules():
                if layer is not m and hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            return m
        return reinit
    return model


def label_issue_scores(
    X: np.ndarray,
    y: np.ndarray,
    *,
    method: str = "combined",
    **kwargs,
) -> np.ndarray:
    """One score per example, higher = more likely mislabeled.

    Args:
        X: ``[N, ...]`` features. y: ``[N]`` given labels ``0..C-1``.
        method: one of :data:`METHODS` (default ``combined``: rank average of all).
        num_classes: ``C`` (default ``max(y) + 1``).
        model: ``None`` (an MLP of ``width``), an ``nn.Module`` (copied and re-initialized
            per fold) or a factory ``k -> nn.Module``.
        folds, epochs, batch_size, lr, momentum, weight_decay, width, seed: training.

    Returns:
        ``[N]`` float array.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return label_issue_signals(X, y, **kwargs).signals[method].to_numpy()


def confident_issue_mask(pred_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Confident-learning style cut: example ``i`` is an issue if some other class ``k``
    has ``p_k >= t_k`` (``t_k`` = mean ``p_k`` over examples labelled ``k``) and ``k`` is the
    most probable such class. ``[N, C], [N] -> [N]`` bool."""
    p = np.asarray(pred_probs)
    c = p.shape[1]
    t = np.array([p[y == k, k].mean() if (y == k).any() else 1.0 for k in range(c)])
    above = p >= t[None, :]
    masked = np.where(above, p, -np.inf)
    best = masked.argmax(1)
    return above.any(1) & (best != y)


def find_label_issues(
    X: np.ndarray,
    y: np.ndarray,
    *,
    num_issues: int | None = None,
    method: str = "combined",
    return_details: bool = False,
    **kwargs,
):
    """Positions of likely label issues, most suspect first.

    The number returned is ``num_issues`` if given, else the count from a confident-learning
    cut on the out-of-fold probabilities (:func:`confident_issue_mask`); the examples
    returned are the top of the ``method`` ranking.

    Args:
        X, y, method, kwargs: as :func:`label_issue_scores`.
        return_details: also return a DataFrame (input order) with ``score``,
            ``given_label``, ``suggested_label`` (out-of-fold argmax) and ``is_issue``.

    Returns:
        ``[M]`` int positions (and the details frame if asked).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    y = np.asarray(y, dtype=np.int64)
    res = label_issue_signals(X, y, **kwargs)
    score = res.signals[method].to_numpy()
    count = int(confident_issue_mask(res.pred_probs, y).sum()) if num_issues is None else int(num_issues)
    order = np.argsort(-score, kind="stable")[:count]
    if not return_details:
        return order
    is_issue = np.zeros(len(y), dtype=bool)
    is_issue[order] = True
    details = pd.DataFrame({"score": score, "given_label": y, "suggested_label": res.pred_probs.argmax(1),
                            "is_issue": is_issue})
    return order, details
