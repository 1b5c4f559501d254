"""Label issues of a data set as a table, and how well they recover injected label noise.

    result = rank_label_issues(train, method="combined", folds=5, epochs=20, seed=0)
    result.table      # flagged examples, most suspect first: example_id, score, given_label, ...
    result.quality    # precision / recall / AUROC against the injected noise (None without)

``gradsift issues`` writes ``result.table`` as its CSV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data import Dataset
from ..errors import DataError, SpecError
from ..label_issues import METHODS, find_label_issues


@dataclass
class LabelIssues:
    """What :func:`rank_label_issues` returns."""

    table: pd.DataFrame       # the flagged examples, most suspect first
    n_examples: int           # examples ranked
    quality: dict | None      # detection_quality against injected noise, if any was injected


def detection_quality(is_noisy: np.ndarray, flagged: np.ndarray, score: np.ndarray) -> dict:
    """How well a ranking finds injected label errors.

    Args:
        is_noisy: ``[N]`` bool, the labels that were corrupted.
        flagged: ``[M]`` int positions flagged as issues.
        score: ``[N]`` issue score of every example (higher: more suspect).

    Returns:
        ``injected`` (count), ``precision`` and ``recall`` of the flagged set, and the
        ``auroc`` of ``score`` for telling corrupted from clean labels (``nan`` when only
        one kind is present).
    """
    from sklearn.metrics import roc_auc_score

    is_noisy = np.asarray(is_noisy, dtype=bool)
    injected = int(is_noisy.sum())
    hits = int(is_noisy[flagged].sum())
    both = 0 < injected < len(is_noisy)
    return {
        "injected": injected,
        "precision": hits / len(flagged) if len(flagged) else float("nan"),
        "recall": hits / injected if injected else float("nan"),
        "auroc": float(roc_auc_score(is_noisy, score)) if both else float("nan"),
    }


def rank_label_issues(train: Dataset, *, method: str = "combined", folds: int = 5, epochs: int = 20,
                      width: int = 128, num_issues: int | None = None, seed: int = 0) -> LabelIssues:
    """Rank likely label issues of ``train`` (see :func:`gradsift.find_label_issues`).

    The table holds the flagged examples, most suspect first: ``example_id``, ``score``,
    ``given_label``, ``suggested_label``, and ``corrupted`` when ``train`` has injected noise.
    """
    if method not in METHODS:
        raise SpecError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    n, classes = len(train), len(np.unique(train.y))
    if classes < 2:
        raise DataError(f"all {n} training labels are one class; finding label issues needs at least two classes")
    if not 2 <= folds <= n:
        raise DataError(f"{folds} cross-validation folds need at least {folds} training examples, and the data "
                        f"set has {n}; " + (f"use --folds {n} or fewer" if n >= 2 else "use a larger data set"))
    order, details = find_label_issues(train.x, train.y, num_classes=train.num_classes, method=method,
                                       folds=folds, epochs=epochs, width=width, num_issues=num_issues,
                                       seed=seed, return_details=True)
    table = details.iloc[order].copy()
    table.insert(0, "example_id", train.example_ids[order])
    table = table.drop(columns=["is_issue"])
    quality = None
    if len(train.corrupted):
        table["corrupted"] = train.is_noisy[order]
        quality = detection_quality(train.is_noisy, order, details.score.to_numpy())
    return LabelIssues(table, len(train), quality)
