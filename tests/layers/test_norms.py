"""LayerNorm, RMSNorm and GroupNorm rules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import SeqFirst, check_path, check_per_example

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


@pytest.mark.parametrize("layer", [nn.LayerNorm(3), nn.RMSNorm(3)], ids=["layernorm", "rmsnorm"])
def test_sequence_first_with_t_equal_b(layer):
    x = torch.randn(4, 4, 3)
    check_per_example(SeqFirst(layer), x)
    assert check_path(SeqFirst(layer), x) == "hooks"


class ChannelSwap(nn.Module):
    """GroupNorm over [T, C, B] (batch last, T == B == C): the rule needs the batch on axis 0."""

    def __init__(self):
        super().__init__()
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x):  # [B, C, T]
        return self.gn(x.transpose(0, 2)).transpose(0, 2)


def test_group_norm_t_equal_b():
    x = torch.randn(4, 4, 4)
    check_per_example(nn.GroupNorm(2, 4), x)
    # batch on axis 2: refused by the rule, computed by torch.func, still exact
    assert check_path(ChannelSwap(), x) == "vmap"
    check_per_example(ChannelSwap(), x, methods=("auto", "vmap"))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_instance_norm(nd):
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]
    layer = cls(3, affine=True)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 3, *([3] * nd))
    check_per_example(layer, x)
    tracked = cls(3, affine=True, track_running_stats=True)
    tracked(torch.randn(8, 3, *([3] * nd)))
    tracked.eval()
    check_per_example(tracked, x)
