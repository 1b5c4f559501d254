import math

import pytest
import torch
from torch import nn

import gradsift as gs


def test_identical_gradients_alpha_one():
    g = torch.randn(1, 6).repeat(8, 1)
    c = gs.coherence({"w": g})
    assert c["alpha"] == pytest.approx(1.0)
    assert c["m_coherence"] == pytest.approx(8.0)
    assert c["alpha_ratio"] == pytest.approx(8.0)


def test_orthogonal_gradients_alpha_one_over_m():
    m = 5
    g = torch.diag(torch.arange(1.0, m + 1))  # orthogonal, different norms
    c = gs.coherence({"w": g})
    # ||mean||^2 = sum(k^2)/m^2, mean ||g||^2 = sum(k^2)/m -> alpha = 1/m
    assert c["alpha"] == pytest.approx(1 / m)
    assert c["m_coherence"] == pytest.approx(1.0)


def test_hand_computed_and_per_layer():
    # g1 = (1, 0 | 2), g2 = (3, 0 | 0): mean = (2, 0 | 1); ||mean||^2 = 5
    # ||g1||^2 = 5, ||g2||^2 = 9 -> mean 7 -> alpha = 5/7
    grads = {"a": torch.tensor([[1.0, 0.0], [3.0, 0.0]]), "b": torch.tensor([[2.0], [0.0]])}
    c = gs.coherence(grads, per_layer=True)
    assert c["alpha"] == pytest.approx(5 / 7)
    assert c["m_coherence"] == pytest.approx(10 / 7)
    assert c["layers"]["a"]["alpha"] == pytest.approx(4 / 5)  # mean (2,0): 4; norms 1, 9 -> 5
    assert c["layers"]["b"]["alpha"] == pytest.approx(1 / 2)  # mean 1: 1; norms 4, 0 -> 2


def test_zero_gradients_and_errors():
    assert math.isnan(gs.coherence({"w": torch.zeros(3, 2)})["alpha"])
    with pytest.raises(ValueError):
        gs.coherence({})
    with pytest.raises(ValueError):
        gs.coherence({"w": torch.zeros(0, 2)})


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
    lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)),
    lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),  # not hookable: per-example path
])
def test_model_coherence_equals_coherence_of_the_gradients(make):
    from gradsift.coherence import model_coherence
    from gradsift.engine import per_example

    torch.manual_seed(0)
    model = make()
    model.eval()  # BatchNorm in eval mode: per example, but not a layer the hooks take
    x = torch.randn(7, 6) if isinstance(model[0], nn.Linear) else torch.randn(7, 2, 6)
    y = torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss(reduction="none")
    want = gs.coherence(per_example(model, loss, x, y).grads, per_layer=True)
    got = model_coherence(model, loss, x, y, per_layer=True)
    assert got["m"] == want["m"] == 7
    assert got["alpha"] == pytest.approx(want["alpha"], rel=1e-5)
    for name, stats in want["layers"].items():
        assert got["layers"][name]["m_coherence"] == pytest.approx(stats["m_coherence"], rel=1e-5), name
