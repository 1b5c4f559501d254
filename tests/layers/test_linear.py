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
