"""Ensembles: vmapped training equals training the members one after another."""

import pytest
import torch
from torch import nn

from gradsift.ensemble import schedule, subset_masks, train_ensemble

CE = nn.CrossEntropyLoss(reduction="none")


def factory():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_vmap_equals_sequential(momentum):
    x, y = data()
    subsets = [torch.arange(0, 30), torch.arange(10, 40), torch.arange(0, 17)]  # unequal sizes
    opt = lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=momentum)
    kw = dict(epochs=3, batch_size=8, seeds=[3, 4, 5], optimizer=opt)
    v = train_ensemble(factory, CE, x, y, subsets, method="vmap", **kw)
    s = train_ensemble(factory, CE, x, y, subsets, method="sequential", **kw)
    for n in v.params:
        torch.testing.assert_close(v.params[n], s.params[n], atol=1e-5, rtol=1e-4)
    for k in range(3):  # members differ (own seeds and subsets) and trained (moved from init)
        torch.manual_seed(kw["seeds"][k])
        init = factory()
        assert not torch.allclose(init[0].weight, v.params["0.weight"][k])
        torch.testing.assert_close(v.member(k)(x), v.predict(x)[k])
    assert v.correct(x, y).shape == (3, 40)


def test_members_learn_their_subsets():
    x, y = data(60)
    masks = subset_masks(60, 4, 0.5, seed=1)
    assert masks.shape == (4, 60) and (masks.sum(1) == 30).all()
    ens = train_ensemble(factory, CE, x, y, masks, epochs=60, lr=0.5, batch_size=10)
    acc_in = (ens.correct(x, y) & masks).sum(1) / masks.sum(1)
    assert (acc_in > 0.8).all(), acc_in


def test_schedule_and_errors():
    plan = schedule([torch.arange(5), torch.arange(5, 8)], [0, 1], epochs=2, batch_size=2)
    assert plan.shape == (6, 2, 2)
    # member 1 has 3 examples: every shuffle covers all of them exactly once
    first = plan[:, 1].flatten()[:3]
    assert sorted(first.tolist()) == [5, 6, 7]
    x, y = data()
    with pytest.raises(ValueError, match="empty"):
        train_ensemble(factory, CE, x, y, [torch.arange(3), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="seed"):
        train_ensemble(factory, CE, x, y, [torch.arange(3)], seeds=[1, 2])


def test_batchnorm_models_train_sequentially():
    x, y = data()
    bn = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    ens = train_ensemble(bn, CE, x, y, [torch.arange(20), torch.arange(20, 40)], epochs=1, batch_size=8)
    assert ens.params["0.weight"].shape == (2, 8, 6)
    assert not torch.equal(ens.buffers["1.running_mean"][0], torch.zeros(8))
