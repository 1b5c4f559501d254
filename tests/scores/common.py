"""Shared harness for registered scores: every score, recorder or function, is computed
by name through the registry on a small data set with flipped labels, and must

* write its registered columns, one row per ``example_id``, finite values;
* when ``detects_noise``: rank the flipped examples as harder (registered orientation)
  than the clean ones (AUROC above ``min_auroc``).

A new score's test calls :func:`check_score` (and adds its hand-computed values)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from gradsift.data import Dataset
from gradsift.scores import SCORES, ScoreSettings, compute_scores, hardness

FAST = ScoreSettings(width=32, epochs=8, batch_size=16, lr=0.1, diet_inits=2, diet_epochs=1, mem_models=8)


def noisy_blobs(n: int = 120, classes: int = 3, flip: float = 0.15, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """Separable Gaussian blobs with a fraction ``flip`` of labels moved to another class:
    ``(data, flipped [N] bool)``."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = g.normal(0, 3, (classes, 8))
    x = (centers[y] + g.normal(0, 1, (n, 8))).astype(np.float32)
    flipped = g.random(n) < flip
    noisy = np.where(flipped, (y + g.integers(1, classes, n)) % classes, y)
    return Dataset(x, noisy.astype(np.int64), classes, name="blobs"), flipped


def check_score(name: str, *, detects_noise: bool = True, min_auroc: float = 0.7,
                settings: ScoreSettings = FAST, table=None):
    """Compute registered score ``name`` through the registry (or take it from ``table``,
    computed by :func:`compute_scores` on :func:`noisy_blobs`) and check its contract;
    returns the table."""
    entry = SCORES[name]
    data, flipped = noisy_blobs()
    if table is None:
        table = compute_scores(data, settings, [name])
        assert list(table.columns) == ["label", *entry.columns]
    assert list(table.index) == list(data.example_ids) and table.index.name == "example_id"
    assert set(entry.columns) <= set(table.columns)
    values = table[entry.column].to_numpy(dtype=float)
    assert not np.isinf(values).any() and np.isfinite(values).mean() >= 0.9  # NaN: undefined (e.g. mem)
    if detects_noise:
        auroc = roc_auc_score(flipped, hardness(table, name))
        assert auroc > min_auroc, f"{name}: AUROC {auroc:.3f} for flipped labels"
    return table
