"""Label corruption: symmetric, asymmetric (class pairs) and random labels."""

from __future__ import annotations

import copy

import numpy as np

from ..errors import DataError
from .dataset import Dataset


def _with_labels(data: Dataset, new_y: np.ndarray) -> Dataset:
    out = copy.copy(data)
    out.clean_y = data.y.copy() if data.clean_y is None else data.clean_y
    out.y = new_y.astype(np.int64)
    out.corrupted = np.flatnonzero(out.y != out.clean_y).astype(np.int64)
    return out


def symmetric_noise(data: Dataset, rate: float, *, seed: int = 0) -> Dataset:
    """Flip a ``rate`` fraction of labels, each to a different class drawn uniformly.

    Exactly ``round(rate * N)`` examples (chosen at random) get a wrong label.
    """
    if not 0 <= rate <= 1:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    if data.num_classes < 2:
        raise DataError("label noise needs at least 2 classes")
    rng = np.random.default_rng(seed)
    n = len(data)
    idx = rng.choice(n, size=int(round(rate * n)), replace=False)
    y = data.y.copy()
    shift = rng.integers(1, data.num_classes, size=len(idx))
    y[idx] = (y[idx] + shift) % data.num_classes
    return _with_labels(data, y)


def asymmetric_noise(
    data: Dataset, rate: float, *, pairs: dict[int, int] | None = None, seed: int = 0
) -> Dataset:
    """Class-pair noise: a ``rate`` fraction of each source class is relabelled to its
    pair class. Default pairs: ``c -> (c + 1) % num_classes``."""
    if not 0 <= rate <= 1:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    k = data.num_classes
    pairs = pairs if pairs is not None else {c: (c + 1) % k for c in range(k)}
    for a, b in pairs.items():
        if not (0 <= a < k and 0 <= b < k) or a == b:
            raise DataError(f"bad class pair {a} -> {b} for {k} classes")
    rng = np.random.default_rng(seed)
    y = data.y.copy()
    for a, b in pairs.items():
        members = np.flatnonzero(data.y == a)
        chosen = rng.choice(members, size=int(round(rate * len(members))), replace=False)
        y[chosen] = b
    return _with_labels(data, y)


def random_labels(data: Dataset, *, seed: int = 0) -> Dataset:
    """Replace every label by one drawn uniformly from all classes (Zhang et al. 2017)."""
    rng = np.random.default_rng(seed)
    return _with_labels(data, rng.integers(0, data.num_classes, size=len(data)))


def corrupt(data: Dataset, kind: str, rate: float = 0.0, *, seed: int = 0) -> Dataset:
    """Dispatch: ``kind`` in ``none``, ``symmetric``, ``asymmetric``, ``random``."""
    if kind in ("none", "", None) or (kind != "random" and rate == 0):
        return data
    if kind == "symmetric":
        return symmetric_noise(data, rate, seed=seed)
    if kind == "asymmetric":
        return asymmetric_noise(data, rate, seed=seed)
    if kind == "random":
        return random_labels(data, seed=seed)
    raise DataError(f"unknown label noise '{kind}': use none, symmetric, asymmetric or random")
