"""Embedding rule (padding_idx, scale_grad_by_freq, max_norm, sparse)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import SeqFirst, check_path, check_per_example

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@SETTINGS
@given(
    b=st.integers(1, 4), t=st.integers(1, 6), v=st.integers(2, 12), d=st.integers(1, 5),
    pad=st.booleans(), freq=st.booleans(), seed=st.integers(0, 2**16),
)
def test_embedding(b, t, v, d, pad, freq, seed):
    torch.manual_seed(seed)
    layer = nn.Embedding(v, d, padding_idx=0 if pad else None, scale_grad_by_freq=freq)
    check_per_example(layer, torch.randint(0, v, (b, t)))


def test_max_norm_and_sparse():
    # method="vmap" cannot run these (torch.func limitation), the hooks path can
    layer = nn.Embedding(10, 4, max_norm=1.0)
    x = torch.randint(0, 10, (5, 3))
    layer(x)  # renormalize the rows the batch touches, as the batched pass will
    check_per_example(layer, x, methods=("hooks",))
    check_per_example(nn.Embedding(10, 4, sparse=True), x, methods=("hooks",))


def test_sequence_first_with_t_equal_b():
    x = torch.randint(0, 9, (4, 4))
    check_per_example(SeqFirst(nn.Embedding(9, 3)), x)
    assert check_path(SeqFirst(nn.Embedding(9, 3)), x) == "hooks"


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("pad", [False, True])
def test_embedding_bag(mode, pad):
    layer = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0 if pad else None)
    x = torch.randint(0, 9, (4, 5))
    check_per_example(layer, x, methods=("hooks", "auto"))
    assert check_path(layer, x) == "hooks"


class Weighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode="sum")

    def forward(self, x, w):
        return self.bag(x, per_sample_weights=w)


def test_embedding_bag_per_sample_weights():
    x, w = torch.randint(0, 9, (3, 4)), torch.rand(3, 4)
    check_per_example(Weighted(), (x, w), methods=("hooks",))
