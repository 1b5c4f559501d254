"""Hook fast path == torch.func path; ghost norms == materialized norms; fallbacks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsift as gs
from gradsift import fastpath
from gradsift.engine import per_example, per_example_norms

CE = nn.CrossEntropyLoss(reduction="none")
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def probe_loss(out, t):
    """A nonlinear per-example loss of any output shape: ``[B, ...] -> [B]``."""
    s = (out.flatten(1) * t.flatten(1)).sum(1)
    return s.square() + out.flatten(1).square().sum(1) * 0.1


def assert_paths_agree(model, x, loss_fn=probe_loss, targets=None, atol=1e-5):
    with torch.no_grad():
        out = model(x)
    if targets is None:
        targets = torch.randn_like(out)
    hooks = per_example(model, loss_fn, x, targets, method="hooks")
    ref = per_example(model, loss_fn, x, targets, method="vmap")
    assert set(hooks.grads) == set(ref.grads)
    for n in ref.grads:
        torch.testing.assert_close(hooks.grads[n], ref.grads[n], atol=atol, rtol=1e-4)
    torch.testing.assert_close(hooks.losses, ref.losses, atol=atol, rtol=1e-4)
    ghost = per_example_norms(model, loss_fn, x, targets, method="hooks", per_layer=True)
    for n, g in ref.grads.items():
        torch.testing.assert_close(ghost[n], g.flatten(1).norm(dim=1), atol=atol, rtol=1e-4)
    total = per_example_norms(model, loss_fn, x, targets, method="hooks")
    torch.testing.assert_close(total, gs.engine.grad_norms(ref.grads), atol=atol, rtol=1e-4)


@SETTINGS
@given(
    b=st.integers(1, 5), extra=st.lists(st.integers(1, 4), max_size=2), i=st.integers(1, 7),
    o=st.integers(1, 7), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_linear(b, extra, i, o, bias, seed):
    torch.manual_seed(seed)
    assert_paths_agree(nn.Linear(i, o, bias=bias), torch.randn(b, *extra, i))


@SETTINGS
@given(
    b=st.integers(1, 4), c=st.integers(1, 3), g=st.sampled_from([1, 2]), o=st.integers(1, 3),
    k=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), bias=st.booleans(),
    two_d=st.booleans(), seed=st.integers(0, 2**16),
)
def test_conv(b, c, g, o, k, stride, dil, pad, mode, bias, two_d, seed):
    torch.manual_seed(seed)
    size = 7
    cls = nn.Conv2d if two_d else nn.Conv1d
    layer = cls(c * g, o * g, k, stride=stride, dilation=dil, padding=pad, groups=g,
                bias=bias, padding_mode=mode)
    x = torch.randn(b, c * g, *([size] * (2 if two_d else 1)))
    assert_paths_agree(layer, x)


def test_conv_same_padding():
    torch.manual_seed(0)
    assert_paths_agree(nn.Conv2d(2, 3, (2, 3), padding="same", dilation=2), torch.randn(3, 2, 6, 5))


@SETTINGS
@given(
    b=st.integers(1, 4), t=st.integers(1, 6), v=st.integers(2, 12), d=st.integers(1, 5),
    pad=st.booleans(), seed=st.integers(0, 2**16),
)
def test_embedding(b, t, v, d, pad, seed):
    torch.manual_seed(seed)
    layer = nn.Embedding(v, d, padding_idx=0 if pad else None)
    assert_paths_agree(layer, torch.randint(0, v, (b, t)))


@SETTINGS
@given(
    b=st.integers(1, 4), t=st.integers(1, 3), d=st.integers(1, 5), kind=st.sampled_from(["ln", "rms", "gn"]),
    affine=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_norm_layers(b, t, d, kind, affine, bias, seed):
    torch.manual_seed(seed)
    if kind == "ln":
        layer = nn.LayerNorm((t, d), elementwise_affine=True, bias=bias)
        x = torch.randn(b, 2, t, d)
    elif kind == "rms":
        layer = nn.RMSNorm(d)
        x = torch.randn(b, t, d)
    else:
        layer = nn.GroupNorm(2, 2 * d, affine=True)
        x = torch.randn(b, 2 * d, t, 3)
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.normal_()
    assert_paths_agree(layer, x)


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
    assert fastpath.unsupported_layers(Scaled()) == ["Scaled"]


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        per_example(nn.Linear(2, 2), CE, torch.randn(2, 2), torch.zeros(2, dtype=torch.long), method="x")
