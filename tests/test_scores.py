import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift.data import Dataset
from gradsift.scores import (
    color_filter_scores, cumulative_loss, data_diet_scores, el2n, forgetting_events, forgetting_score,
    grand, learning_time, margin, memorization_estimate, memorization_scores, mlp_factory,
    penultimate_embeddings, predict_members, prototype_distance, subset_masks, tracin, train_members,
)


def zero_linear():
    m = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(m.weight)
    return m


def test_el2n_and_margin_by_hand():
    out = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    # p = (.5,.5) -> ||(-.5,.5)|| = sqrt(.5); p = (.75,.25), y=1 -> ||(.75,-.75)|| = .75 sqrt(2)
    torch.testing.assert_close(el2n(out, y), torch.tensor([math.sqrt(0.5), 0.75 * math.sqrt(2)]))
    p = torch.tensor([[0.7, 0.2, 0.1]])
    torch.testing.assert_close(margin(p.log(), torch.tensor([0])), torch.tensor([0.5]))
    torch.testing.assert_close(margin(p.log(), torch.tensor([2])), torch.tensor([-0.6]))


def test_grand_and_tracin_by_hand():
    model = zero_linear()
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    # dL/dW = (p - onehot) x^T = [[-.5, -1], [.5, 1]]  ->  ||.||^2 = 2.5
    torch.testing.assert_close(grand(model, x, y), torch.tensor([math.sqrt(2.5)]))
    xt, yt = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    # test gradient [[.5, 0], [-.5, 0]]; dot with the training gradient = -.25 - .25 = -.5
    s, c = tracin([(model, 0.1), (model, 0.3)], x, y, x_test=xt, y_test=yt)
    torch.testing.assert_close(s, torch.tensor([0.4 * 2.5]))
    torch.testing.assert_close(c, torch.tensor([[0.4 * -0.5]]))


def test_color_filter_by_hand():
    prior, cond = zero_linear(), zero_linear()
    with torch.no_grad():
        cond.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x, y = torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0])
    # prior loss ln 2; conditioned p_0 = 3/4 -> loss ln(4/3)
    torch.testing.assert_close(color_filter_scores(prior, cond, x, y), torch.tensor([math.log(2) - math.log(4 / 3)]))


def test_prototype_distance_by_hand():
    e = np.array([[0, 0], [2, 0], [0, 3], [0, 5], [0, 7]], float)
    lab = np.array([0, 0, 1, 1, 1])
    np.testing.assert_allclose(prototype_distance(e, lab), [1, 1, 2, 0, 2], atol=1e-9)
    # two clusters per class: every point of a 2-point class is its own centroid
    np.testing.assert_allclose(prototype_distance(e, lab, clusters_per_class=2)[:2], [0, 0], atol=1e-9)


def test_penultimate_embeddings_are_classifier_inputs():
    model = gs.models.mlp(4, 3, width=5, depth=2)
    x = torch.randn(7, 4)
    emb = penultimate_embeddings(model, x)
    assert emb.shape == (7, 5)
    torch.testing.assert_close(model[-1](emb), model(x))


SCRIPT = np.array([  # rows: epochs 1..4; columns: examples A..E
    [1, 0, 1, 1, 0],
    [0, 0, 1, 0, 1],
    [1, 0, 1, 1, 0],
    [1, 0, 1, 0, 1],
], bool)


def test_forgetting_and_learning_time_on_a_script():
    np.testing.assert_array_equal(forgetting_events(SCRIPT), [1, 0, 0, 2, 1])
    np.testing.assert_array_equal(forgetting_score(SCRIPT), [1, 4, 0, 2, 1])  # never learned -> T
    np.testing.assert_array_equal(learning_time(SCRIPT), [3, 5, 1, 5, 4])
    np.testing.assert_allclose(cumulative_loss(np.array([[1.0, 2.0], [0.5, 0.25]])), [1.5, 2.25])


def test_memorization_estimator_by_hand():
    in_mask = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    correct = np.array([[1, 0], [1, 1], [0, 1], [1, 0]], bool)
    est = memorization_estimate(in_mask, correct)
    np.testing.assert_allclose(est.mem, [0.5, 1.0])
    np.testing.assert_allclose(est.mem_se, [math.sqrt(0.25 / 2), 0.0])
    np.testing.assert_array_equal(est.n_in, [2, 2])
    assert np.isnan(memorization_estimate(np.ones((2, 1), bool), np.ones((2, 1), bool)).mem[0])


def test_subset_masks_exact_size():
    m = subset_masks(50, 6, 0.3, seed=1)
    assert m.shape == (6, 50) and (m.sum(1) == 15).all()


def _tiny(n=60, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    return Dataset(x, y, 4, name="tiny")


def test_vmap_members_equal_loop_members():
    data = _tiny()
    x, y = data.tensors()
    masks = subset_masks(len(data), 3, 0.5, seed=2)
    mf = mlp_factory(data, width=8)
    a = train_members(mf, x, y, masks, epochs=2, batch_size=8, vectorize=True)
    b = train_members(mf, x, y, masks, epochs=2, batch_size=8, vectorize=False)
    torch.testing.assert_close(predict_members(a, x), predict_members(b, x), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(predict_members(a, x)[0], predict_members(a, x)[1])


def test_data_diet_at_init_is_mean_over_inits():
    data = _tiny()
    mf = mlp_factory(data, width=8, seed=3)
    x, y = data.tensors()
    got = data_diet_scores(data, mf, n_inits=2, epochs=0)
    models = [mf(0), mf(1)]
    want_el2n = (el2n(models[0](x), y) + el2n(models[1](x), y)) / 2
    want_grand = (grand(models[0], x, y) + grand(models[1], x, y)) / 2
    np.testing.assert_allclose(got.el2n, want_el2n.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.grand, want_grand.numpy(), rtol=1e-5)
    assert list(got.index) == list(data.example_ids)


def test_memorization_duplicated_vs_unique_outlier():
    """Two clusters (classes 0, 1); a unique outlier with its own class 2, and an atypical
    point of class 3 duplicated 6 times. The outlier is classified correctly only when it
    is trained on (mem ~ 1); the duplicated one nearly always has a copy in the subset (mem ~ 0)."""
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal((-2, 0), 0.3, (40, 2)), g.normal((2, 0), 0.3, (40, 2)),
                        [[0.0, 3.0]], np.repeat([[0.0, -3.0]], 6, 0)]).astype(np.float32)
    y = np.array([0] * 40 + [1] * 40 + [2] + [3] * 6)
    data = Dataset(x, y, 4)
    mf = mlp_factory(data, width=32)
    mem = memorization_scores(data, mf, n_models=16, fraction=0.5, epochs=40, batch_size=16, lr=0.1)
    assert mem.loc[80, "mem"] > 0.8, mem.loc[80]
    assert mem.loc[81:86, "mem"].abs().max() < 0.2, mem.loc[81:86]
    assert mem.loc[:79, "mem"].abs().mean() < 0.1
    assert 0 <= mem.loc[80, "mem_se"] < 0.25
