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


class FlatBags(nn.Module):
    """``(tokens [B, L], lengths [B], weights [B, L])`` -> EmbeddingBag on the flat
    ``(input [N], offsets [B])`` form: ``tokens[mask]`` (ragged) or ``tokens.reshape(-1)``."""

    def __init__(self, mode: str, how: str, pad: bool = False, last: bool = False, weighted: bool = False):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0 if pad else None, include_last_offset=last)
        self.how, self.weighted = how, weighted

    def forward(self, tokens, lengths, weights):
        b, length = tokens.shape
        if self.how == "ragged":
            mask = torch.arange(length) < lengths.unsqueeze(1)
            flat, psw = tokens[mask], weights[mask]
            ends = lengths.cumsum(0)
            offsets = ends - lengths
        else:
            flat, psw = tokens.reshape(-1), weights.reshape(-1)
            ends = torch.arange(1, b + 1) * length
            offsets = ends - length
        if self.bag.include_last_offset:
            offsets = torch.cat([offsets, ends[-1:]]) if b else ends.new_zeros(1)
        return self.bag(flat, offsets, per_sample_weights=psw if self.weighted else None)


def flat_data(b, length=4):
    torch.manual_seed(b)
    lengths = torch.randint(0, length + 1, (b,))
    return torch.randint(0, 9, (b, length)), lengths, torch.rand(b, length)


@pytest.mark.parametrize("how", ["ragged", "reshaped"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_embedding_bag_offsets(how, mode, pad, last):
    model = FlatBags(mode, how, pad=pad, last=last)
    x = flat_data(4)
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks", "auto"))


@pytest.mark.parametrize("how", ["ragged", "reshaped"])
def test_embedding_bag_offsets_per_sample_weights(how):
    model = FlatBags("sum", how, weighted=True)
    check_per_example(model, flat_data(3), methods=("hooks",))


@pytest.mark.parametrize("b", [0, 1, 3])
def test_embedding_bag_offsets_t_equal_b_b0_b1(b):
    check_per_example(FlatBags("mean", "ragged"), flat_data(b, length=b), methods=("hooks",))


class Crossing(nn.Module):
    """Offsets that put example 1's first token into bag 0: not per-example."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 4, mode="sum")

    def forward(self, tokens):
        b, length = tokens.shape
        offsets = torch.arange(b) * length + (torch.arange(b) > 0).long()
        return self.bag(tokens.reshape(-1), offsets)


def test_embedding_bag_offsets_across_examples_is_refused():
    x = torch.randint(0, 9, (3, 4))
    assert check_path(Crossing(), x) == "vmap"
