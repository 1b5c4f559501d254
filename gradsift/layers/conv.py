"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: a matrix product per output position.

The input is unfolded into patches ``[B, C/G * prod(kernel), L]`` (``L`` output
positions), so each group is a :class:`~gradsift.layers.linear.MatmulRule` layer over
``L`` positions. Padding modes ``zeros``, ``reflect``, ``replicate`` and ``circular``
(and ``padding='same'``) are applied to the input first.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import register_layer_rule
from .linear import MatmulRule

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def unfold_patches(m: nn.Module, a: Tensor) -> Tensor:
    """Input patches ``[B, C * prod(kernel), L]`` of a Conv1d/2d/3d, laid out as its weight."""
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    pad = m._reversed_padding_repeated_twice
    if any(pad):
        a = F.pad(a, pad, mode=mode)
    nd = a.ndim - 2
    if nd <= 2:
        if nd == 1:
            a = a.unsqueeze(2)
            kernel, dil, stride = (1, *m.kernel_size), (1, *m.dilation), (1, *m.stride)
        else:
            kernel, dil, stride = m.kernel_size, m.dilation, m.stride
        return F.unfold(a, kernel, dilation=dil, padding=0, stride=stride)
    # N-d: take windows of the dilated extent, keep every dil-th element
    b, c = a.shape[:2]
    for ax, (k, dl, s) in enumerate(zip(m.kernel_size, m.dilation, m.stride)):
        a = a.unfold(2 + ax, (k - 1) * dl + 1, s)[..., ::dl]
    # [B, C, *out, *kernel] -> [B, C, *kernel, *out]
    perm = (0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return a.permute(perm).reshape(b, c * math.prod(m.kernel_size), -1)


@register_layer_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(MatmulRule):
    """Conv1d/2d/3d with any stride, padding (incl. ``'same'``), dilation and groups."""

    def supports(self, module: nn.Module) -> bool:
        return module.padding_mode in PADDING_MODES

    def positions(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b, g = a.shape[0], module.groups
        patches = unfold_patches(module, a)  # [B, C*k, L]
        length = patches.shape[-1]
        A = patches.view(b, g, -1, length).transpose(2, 3)
        D = d.reshape(b, g, -1, length).transpose(2, 3)
        return A, D
