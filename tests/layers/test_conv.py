"""Conv1d/2d/3d rule (stride, padding incl. 'same', dilation, groups, padding modes)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import check_path, check_per_example

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@SETTINGS
@given(
    b=st.integers(1, 3), c=st.integers(1, 2), g=st.sampled_from([1, 2]), o=st.integers(1, 3),
    k=st.integers(1, 3), stride=st.integers(1, 2), dil=st.integers(1, 2), pad=st.integers(0, 2),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), bias=st.booleans(),
    nd=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16),
)
def test_conv(b, c, g, o, k, stride, dil, pad, mode, bias, nd, seed):
    torch.manual_seed(seed)
    size = 6 if nd < 3 else 5
    layer = CONVS[nd](c * g, o * g, k, stride=stride, dilation=dil, padding=pad, groups=g,
                      bias=bias, padding_mode=mode)
    check_per_example(layer, torch.randn(b, c * g, *([size] * nd)))


def test_same_padding():
    check_per_example(nn.Conv2d(2, 3, (2, 3), padding="same", dilation=2), torch.randn(3, 2, 6, 5))
    check_per_example(nn.Conv3d(2, 4, (1, 2, 3), padding="same", groups=2), torch.randn(2, 2, 3, 4, 5))


def test_conv3d_anisotropic():
    layer = nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 2), dilation=(2, 1, 1), padding=(1, 0, 1),
                      padding_mode="replicate")
    check_per_example(layer, torch.randn(3, 3, 5, 6, 4))


class BatchLast(nn.Module):
    """A 1x1 convolution over [L, C, B] (L == C == B): examples never mix, but the batch is not axis 0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 1)

    def forward(self, x):  # [B, C, L]
        return self.conv(x.transpose(0, 2)).transpose(0, 2)


def test_t_equal_b():
    x = torch.randn(3, 3, 3)
    check_per_example(nn.Conv1d(3, 2, 2), x)
    assert check_path(BatchLast(), x) == "vmap"
    check_per_example(BatchLast(), x, methods=("auto",))
