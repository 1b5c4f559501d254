"""Ghost coherence: the B x B Gram of per-example gradients from activation and
output-gradient Grams equals the materialized one; coherence, per-class coherence and
alignment from it equal their definitions (float64 loops)."""

import numpy as np
import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift.coherence import coherence, gradient_gram, gram_coherence

CE = nn.CrossEntropyLoss(reduction="none")


class SeqModel(nn.Module):
    """A Linear applied to a sequence (T > 1), a reused Linear, a Conv1d (fallback rule)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):  # x [B, 2, 6]
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [B, 4, 3]
        h = torch.tanh(self.proj(h)).mean(1)  # [B, 4]
        return self.head(h) + self.head(h * 0.5)


def materialized(model, x, y):
    g = gs.per_example_gradients(model, CE, x, y)
    flat = torch.cat([v.flatten(1) for v in g.values()], 1).double()
    return flat @ flat.T, g


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), (6,)),
    (SeqModel, (2, 6)),
])
def test_gram_equals_materialized(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(9, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    want, grads = materialized(model, x, y)
    got, layers = gradient_gram(model, CE, x, y, per_layer=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert set(layers) == set(grads)
    stats = gram_coherence(got, labels=y)
    ref = coherence(grads)
    assert stats["m_coherence"] == pytest.approx(ref["m_coherence"], rel=1e-9)
    flat = torch.cat([v.flatten(1) for v in grads.values()], 1).double()
    for i in range(len(x)):  # alignment by its definition
        rest = torch.cat([flat[:i], flat[i + 1:]]).mean(0)
        cos = flat[i] @ rest / (flat[i].norm() * rest.norm())
        assert float(stats["alignment"][i]) == pytest.approx(float(cos), rel=1e-9)
    for c, s in stats["per_class"].items():
        idx = (y == c).nonzero().flatten()
        sub = {n: v[idx] for n, v in grads.items()}
        assert s["m_coherence"] == pytest.approx(coherence(sub)["m_coherence"], rel=1e-9)


def test_alignment_score_is_registered_and_low_for_flipped_labels():
    from gradsift.scores import SCORES

    from .scores.common import check_score

    assert not SCORES["alignment"].higher_is_harder
    check_score("alignment", min_auroc=0.7)
