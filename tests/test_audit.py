"""gs.audit: one row per example, flags from automatic cut-offs, injected issues found."""

import numpy as np
import pandas as pd
import pytest
import torch

from gradsift.audit import audit, audit_summary, feature_metric, knn_distances, robust_z, upper_robust_z
from gradsift.data import Dataset


def blobs_with_issues(seed=0):
    """Three separable blobs (150 examples) + 10 label flips, 4 scrambled outliers, 3 copies."""
    g = np.random.default_rng(seed)
    y = np.arange(150) % 3
    x = (g.normal(0, 4, (3, 10))[y] + g.normal(0, 1, (150, 10))).astype(np.float32)
    flips = g.choice(150, 10, replace=False)
    y_noisy = y.copy()
    y_noisy[flips] = (y[flips] + 1) % 3
    outliers = g.normal(0, 1, (4, 10)).astype(np.float32) * 12
    src = np.array([3, 50, 100])
    copies = x[src] + g.normal(0, 1e-3, (3, 10)).astype(np.float32)
    X = np.concatenate([x, outliers, copies])
    Y = np.concatenate([y_noisy, g.integers(0, 3, 4), y_noisy[src]])
    return X, Y, flips, np.arange(150, 154), src


def test_robust_z_and_knn_by_hand():
    np.testing.assert_allclose(robust_z(np.array([1.0, 2.0, 3.0, 4.0, 100.0])),
                               (np.array([1, 2, 3, 4, 100.0]) - 3) / 1.4826)
    d, pos = knn_distances(np.array([[0.0], [1.0], [3.0], [3.0]]), 2)
    np.testing.assert_allclose(d, [[1, 3], [1, 2], [0, 2], [0, 2]])
    assert pos[2, 0] == 3 and pos[3, 0] == 2 and pos[0, 0] == 1
    # one-sided: median 3; numpy's 90th percentile of [1, 2, 3, 4, 100] is 4 + 0.6 * 96
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(upper_robust_z(v), (v - 3) / ((4 + 0.6 * 96 - 3) / 1.2815515655446004))
    # tail=0.5 is the median itself: zero scale, falls back to the standard deviation
    np.testing.assert_allclose(upper_robust_z(v, tail=0.5), (v - 3) / v.std())
    # the bulk of a large normal sample scores as a standard normal
    z = upper_robust_z(np.random.default_rng(0).normal(5.0, 2.0, 200_000))
    assert abs(np.quantile(z, 0.99) - 2.326) < 0.03
    # cosine: [1, 0] and [2, 0] are one direction (distance 0); [0, 1] is orthogonal (distance 1)
    assert feature_metric(np.zeros((3, 4))) == "cosine" and feature_metric(np.zeros((3, 2))) == "euclidean"
    d, _ = knn_distances(np.array([[1.0, 0], [2.0, 0], [0, 1.0]]), 1, metric="cosine")
    np.testing.assert_allclose(d[:, 0], [0, 0, 1], atol=1e-12)


def test_audit_flags_injected_issues():
    X, Y, flips, outliers, src = blobs_with_issues()
    table = audit(X, Y, epochs=15, width=32, folds=3, batch_size=16)
    assert isinstance(table, pd.DataFrame) and table.index.name == "example_id" and len(table) == len(Y)
    for col in ("label_score", "is_label", "suggested_label", "outlier_score", "is_outlier",
                "near_duplicate_score", "is_near_duplicate", "near_duplicate_of"):
        assert col in table.columns
    flagged = set(np.flatnonzero(table.is_label.to_numpy()))
    assert len(flagged & set(flips)) >= 8 and len(flagged - set(flips) - set(outliers)) <= 4
    assert (table.suggested_label.to_numpy()[flips] == (Y[flips] - 1) % 3).mean() >= 0.8
    assert set(np.flatnonzero(table.is_outlier.to_numpy())) >= set(outliers)
    assert (table.outlier_score == table.outlier_score_input).all()
    both = audit(X, Y, epochs=15, width=32, folds=3, batch_size=16, outlier_space="both")
    np.testing.assert_allclose(both.outlier_score, np.maximum(both.outlier_score_input, both.outlier_score_embedding))
    dups = set(np.flatnonzero(table.is_near_duplicate.to_numpy()))
    assert dups >= set(src) | {154, 155, 156} and len(dups) <= 8
    assert table.near_duplicate_of.loc[154] == 3 and table.near_duplicate_of.loc[3] == 154
    s = table.attrs["summary"]
    assert s["class_counts"] == np.bincount(Y).tolist() and s["issues"]["outlier"] >= 4
    assert audit_summary(table)["per_class"][0]["count"] == int((Y == 0).sum())


def test_audit_accepts_a_torch_dataset_and_checks_inputs():
    X, Y, *_ = blobs_with_issues()
    ds = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    table = audit(ds, epochs=2, width=8, folds=2)
    assert len(table) == len(Y)
    table = audit(Dataset(X, Y, 3), epochs=2, width=8, folds=2, label_threshold="aum")
    assert "aum" in table.columns and table.is_label.dtype == bool
    from gradsift.errors import GradsiftError

    with pytest.raises(GradsiftError, match="label_threshold"):
        audit(X, Y, label_threshold="top10")
    with pytest.raises(GradsiftError, match="rows"):
        audit(X, Y[:-1])
