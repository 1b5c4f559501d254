"""Linear rule (2-D, 3-D and 4-D inputs) against the float64 loop."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import SeqFirst, check_path, check_per_example

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@SETTINGS
@given(
    b=st.integers(1, 5), extra=st.lists(st.integers(1, 4), max_size=2), i=st.integers(1, 7),
    o=st.integers(1, 7), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_linear(b, extra, i, o, bias, seed):
    torch.manual_seed(seed)
    check_per_example(nn.Linear(i, o, bias=bias), torch.randn(b, *extra, i))


def test_frozen_bias_and_chunks():
    layer = nn.Linear(5, 3)
    layer.bias.requires_grad_(False)
    ref = check_per_example(layer, torch.randn(7, 2, 5), chunk_size=3)
    assert set(ref) == {"weight"}


def test_sequence_first_with_t_equal_b():
    """[T, B, d] with T == B: the batch axis is traced, not guessed from axis 0's size."""
    x = torch.randn(4, 4, 3)
    check_per_example(SeqFirst(nn.Linear(3, 2)), x)
    assert check_path(SeqFirst(nn.Linear(3, 2)), x) == "hooks"


class Reinterpret(nn.Module):
    """Flattens batch and time ([B*T, d]) and back: the batch is the outer factor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):  # [B, T, d]
        b, t, d = x.shape
        return self.lin(x.reshape(b * t, d)).view(b, t, 2)


def test_flattened_batch():
    check_per_example(Reinterpret(), torch.randn(3, 3, 3))


@SETTINGS
@given(b=st.integers(1, 4), g=st.integers(1, 3), t=st.integers(1, 40), k=st.integers(1, 70),
       o=st.integers(1, 70), grouped=st.booleans(), seed=st.integers(0, 2**16))
def test_outer_norms_sq_by_either_route(b, g, t, k, o, grouped, seed):
    """The ghost route (T x T Grams) and the formed route give ``sum_g ||D_g^T A_g||^2``
    (shapes here take both: a short sequence of wide vectors forms nothing)."""
    from gradsift.layers import outer_norms_sq

    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(b, g, t, o, generator=gen, dtype=torch.float64)
    a = torch.randn(b, g, t, k, generator=gen, dtype=torch.float64)
    want = torch.einsum("bgto,bgtk->bgok", d, a).square().sum((1, 2, 3))
    if not grouped:
        d, a, want = d[:, 0], a[:, 0], torch.einsum("bto,btk->bok", d[:, 0], a[:, 0]).square().sum((1, 2))
    torch.testing.assert_close(outer_norms_sq(d, a), want, rtol=1e-10, atol=1e-10)


def test_outer_norms_sq_routes_are_both_taken(monkeypatch):
    """Wide vectors at few positions take the Grams, long sequences of narrow ones form the
    products: each route is exercised by the test above."""
    from gradsift.layers import base

    calls = []
    monkeypatch.setattr(base.torch.linalg, "vecdot", lambda x, y: calls.append("ghost") or (x * y).sum(1))
    base.outer_norms_sq(torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    base.outer_norms_sq(torch.randn(2, 40, 2), torch.randn(2, 40, 2))
    assert calls == ["ghost"]


def test_outer_norms_sq_names_bad_shapes():
    import pytest

    from gradsift.layers import outer_norms_sq

    with pytest.raises(ValueError, match=r"d \(2, 3, 4\) and a \(2, 5, 4\)"):
        outer_norms_sq(torch.randn(2, 3, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="same leading axes"):
        outer_norms_sq(torch.randn(2, 4), torch.randn(2, 4))
