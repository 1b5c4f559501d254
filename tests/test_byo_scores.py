"""Issue 13: scores and label issues from the user's own model and data (a torch Dataset
plus a model factory, streamed in batches), and cleanlab's ``find_label_issues(labels=,
pred_probs=)`` form, checked against cleanlab itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset as TorchDataset

import gradsift as gs
from gradsift.errors import DataError
from gradsift.scores import data_diet_scores, memorization_scores


def _probs(n=400, c=4, seed=0):
    """Out-of-fold-like probabilities for labels with 15% flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[true]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = true.copy()
    flip = rng.random(n) < 0.15
    labels[flip] = (true[flip] + rng.integers(1, c, flip.sum())) % c
    return labels, p, flip


@pytest.mark.parametrize("ranked_by", ["self_confidence", "normalized_margin"])
def test_pred_probs_form_equals_cleanlab(ranked_by):
    from cleanlab.filter import find_label_issues as cl_find

    for seed in range(3):
        labels, p, _ = _probs(seed=seed)
        want = cl_find(labels, p, filter_by="confident_learning", return_indices_ranked_by=ranked_by)
        got = gs.find_label_issues(labels=labels, pred_probs=p, method=ranked_by)
        np.testing.assert_array_equal(got, want)


def test_pred_probs_form_agrees_with_cleanlab_default_and_finds_flips():
    from cleanlab.filter import find_label_issues as cl_find

    labels, p, flip = _probs(n=1000)
    ours = np.zeros(len(labels), bool)
    ours[gs.find_label_issues(labels=labels, pred_probs=p)] = True
    theirs = cl_find(labels, p)  # prune_by_noise_rate flags more: 178 here, holding all 139 of ours
    assert (ours & theirs).sum() >= 0.95 * ours.sum()
    assert (ours == theirs).mean() > 0.95
    assert (ours & flip).sum() / ours.sum() > 0.85  # precision on the injected flips (0.91 here)


def test_pred_probs_form_takes_class_names():
    labels, p, _ = _probs()
    names = np.array(["ant", "bee", "cat", "dog"])[labels]
    a = gs.find_label_issues(labels=labels, pred_probs=p)
    b, details = gs.find_label_issues(labels=list(names), pred_probs=p, return_details=True)
    np.testing.assert_array_equal(a, b)
    assert set(details.given_label) == {"ant", "bee", "cat", "dog"}
    assert details.suggested_label.iloc[0] in {"ant", "bee", "cat", "dog"}
    c = gs.find_label_issues(labels=list(names), pred_probs=p[:, ::-1], classes=["dog", "cat", "bee", "ant"])
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels=[0, 1]), "needs both labels= and pred_probs="),
    (dict(labels=[0, 1], pred_probs=[[0.5, 0.5]]), "one label per row"),
    (dict(labels=[0, 3], pred_probs=[[0.5, 0.5], [0.2, 0.8]]), "outside pred_probs' 2 columns"),
    (dict(labels=[0, 1], pred_probs=[[2.0, -1.0], [0.2, 0.8]]), "must be probabilities"),
    (dict(labels=["a", "b", "c"], pred_probs=[[0.5, 0.5]] * 3), "pass classes="),
    (dict(labels=["a", 1], pred_probs=[[0.5, 0.5]] * 2), "labels"),
    (dict(labels=[0, 1], pred_probs=[[0.5, 0.5]] * 2, method="combined"), "unknown method 'combined'"),
    (dict(labels=[0, 1], pred_probs=[[0.5, 0.5]] * 2, folds=3), "folds would be ignored"),
])
def test_pred_probs_form_mistakes(kwargs, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("=", "=")):
        gs.find_label_issues(**kwargs)


class Items(TorchDataset):
    """A torch Dataset that builds each item on access (nothing held as one array)."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


def _digits(n=150):
    train, _ = gs.data.load_digits()
    train = train.subset(np.arange(n))
    return train, Items(torch.from_numpy(train.x), train.y)


def _factory():
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


@pytest.mark.parametrize("vectorize", [None, False])
def test_data_diet_and_memorization_from_a_torch_dataset_equal_the_array_form(vectorize):
    train, items = _digits()
    a = data_diet_scores(train, _factory, n_inits=2, epochs=1, seed=3, vectorize=vectorize)
    b = data_diet_scores(items, _factory, n_inits=2, epochs=1, seed=3, vectorize=vectorize)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-6)
    assert list(b.index) == list(range(len(items)))
    assert items.reads > 0
    m1 = memorization_scores(train, _factory, n_models=3, fraction=0.5, epochs=2, seed=1, vectorize=vectorize)
    m2 = memorization_scores(DataLoader(items, batch_size=32), _factory, n_models=3, fraction=0.5, epochs=2, seed=1,
                             vectorize=vectorize)
    pd.testing.assert_frame_equal(m1.reset_index(drop=True), m2.reset_index(drop=True), check_exact=False)


def test_label_issues_from_a_torch_dataset_with_a_factory():
    train, items = _digits(200)
    noisy = gs.data.symmetric_noise(train, 0.2, seed=0)
    noisy_items = Items(torch.from_numpy(noisy.x), noisy.y)
    kw = dict(folds=3, epochs=3, seed=0, model=_factory)
    a = gs.find_label_issues(noisy.x, noisy.y, **kw)
    b = gs.find_label_issues(noisy_items, **kw)
    np.testing.assert_array_equal(a, b)
    names = np.array([f"digit{k}" for k in range(10)])[noisy.y]
    c, details = gs.find_label_issues(noisy.x, list(names), return_details=True, **kw)
    np.testing.assert_array_equal(a, c)
    assert details.given_label.iloc[0].startswith("digit")
    with pytest.raises(DataError, match="need model="):
        gs.find_label_issues(noisy_items, folds=3)
