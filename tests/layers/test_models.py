"""Whole models on the hooks path (shared layers, in-place ops) and fallbacks to torch.func."""

import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift import layers
from gradsift.engine import per_example, per_example_norms

from .harness import check_per_example

CE = nn.CrossEntropyLoss(reduction="none")


def assert_paths_agree(model, x, loss_fn, targets):
    check_per_example(model, x, targets, loss_fn=loss_fn)


class TextModel(nn.Module):
    """Embedding, LayerNorm, Linear on sequences, in-place ReLU, Conv1d, GroupNorm, a layer
    called twice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):  # [B, T] -> [B, 3]
        h = self.proj(self.ln(self.emb(tokens))).relu_()
        h = self.proj(h)  # same layer again: contributions add up
        h = self.gn(self.conv(h.transpose(1, 2)))
        return self.head(torch.relu(h).mean(2))


def test_whole_model_with_shared_layer_and_inplace_relu():
    torch.manual_seed(0)
    x = torch.randint(0, 11, (6, 9))
    assert_paths_agree(TextModel(), x, loss_fn=CE, targets=torch.randint(0, 3, (6,)))


def test_cnn_with_inplace_relu():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3, groups=2),
        nn.GroupNorm(3, 6), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(24, 3),
    )
    assert_paths_agree(model, torch.randn(5, 1, 9, 9), loss_fn=CE, targets=torch.randint(0, 3, (5,)))


class Tied(nn.Module):
    """Output projection reuses the embedding matrix outside the Embedding's forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)

    def forward(self, tokens):
        return self.lin(self.emb(tokens)).mean(1) @ self.emb.weight.T


class Scaled(nn.Module):
    """A layer with a bare parameter (no hook rule)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize(
    "model,x",
    [(Tied(), torch.randint(0, 7, (5, 3))), (Scaled(), torch.randn(5, 4))],
    ids=["tied-outside-layer", "bare-parameter"],
)
def test_auto_falls_back_to_torch_func(model, x):
    torch.manual_seed(0)
    y = torch.randint(0, 3, (5,))
    auto = per_example(model, CE, x, y)
    ref = per_example(model, CE, x, y, method="vmap")
    for n in ref.grads:
        torch.testing.assert_close(auto.grads[n], ref.grads[n])
    torch.testing.assert_close(per_example_norms(model, CE, x, y), gs.engine.grad_norms(ref.grads))
    with pytest.raises(gs.UnsupportedModelError):
        per_example(model, CE, x, y, method="hooks")


def test_frozen_layers_and_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    hooks = per_example(model, CE, x, y, method="hooks", chunk_size=3)
    ref = per_example(model, CE, x, y, method="vmap")
    assert set(hooks.grads) == {"2.weight", "2.bias"}
    for n in ref.grads:
        torch.testing.assert_close(hooks.grads[n], ref.grads[n])
    assert layers.unsupported_layers(Scaled()) == ["Scaled"]


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        per_example(nn.Linear(2, 2), CE, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), method="x")
