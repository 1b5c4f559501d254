"""LayerNorm, RMSNorm and GroupNorm rules."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import check_per_example

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@SETTINGS
@given(
    b=st.integers(1, 4), t=st.integers(1, 3), d=st.integers(1, 5), kind=st.sampled_from(["ln", "rms", "gn"]),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_norm_layers(b, t, d, kind, bias, seed):
    torch.manual_seed(seed)
    if kind == "ln":
        layer, x = nn.LayerNorm((t, d), bias=bias), torch.randn(b, 2, t, d)
    elif kind == "rms":
        layer, x = nn.RMSNorm(d), torch.randn(b, t, d)
    else:
        layer, x = nn.GroupNorm(2, 2 * d), torch.randn(b, 2 * d, t, 3)
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.normal_()
    check_per_example(layer, x)
