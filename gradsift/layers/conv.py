"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``: a matrix product per output position.

The input is unfolded into patches ``[B, C/G * prod(kernel), L]`` (``L`` output
positions), so each group is a :class:`~gradsift.layers.linear.MatmulRule` layer over
``L`` positions. Padding modes ``zeros``, ``reflect``, ``replicate`` and ``circular``
(and ``padding='same'``) are applied to the input first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Capture, Grads, own_trainable, register_layer_rule
from .linear import MatmulRule

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

#: On CPU, the weight's per-example gradients come from one convolution backward with the
#: batch folded into the groups (``groups = B * G``) when a group has at most this many
#: ``in x out`` channels and the output at least :data:`GROUPED_MIN_POSITIONS` positions;
#: there it is several times faster than unfolding the patches (few channels, large images),
#: elsewhere much slower.
GROUPED_MAX_CHANNELS = 1024
GROUPED_MIN_POSITIONS = 100


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

    def grouped(self, module: nn.Module, a: Tensor, d: Tensor) -> bool:
        """Whether :meth:`weight_grouped` is the faster way for this call (see :data:`GROUPED_MAX_CHANNELS`)."""
        g = module.groups
        positions = math.prod(d.shape[2:])
        return a.device.type == "cpu" and a.dtype == d.dtype and \
            (module.in_channels // g) * (module.out_channels // g) <= GROUPED_MAX_CHANNELS and \
            positions >= GROUPED_MIN_POSITIONS

    def weight_grouped(self, module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
        """One call's per-example weight gradients ``[B, *weight.shape]``: the convolution's
        weight gradient with the batch folded into the channels and ``groups = B * G``."""
        b, nd = a.shape[0], a.ndim - 2
        pad = module._reversed_padding_repeated_twice
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            if any(pad):
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                a = F.pad(a, pad, mode=mode)
            padding = [0] * nd
        else:
            padding = list(module.padding)
        weight = module.weight
        shape = (b * weight.shape[0], *weight.shape[1:])
        grad_w = torch.ops.aten.convolution_backward(
            d.reshape(1, b * d.shape[1], *d.shape[2:]), a.reshape(1, b * a.shape[1], *a.shape[2:]),
            a.new_empty(shape), None, list(module.stride), padding, list(module.dilation), False,
            [0] * nd, b * module.groups, [False, True, False],
        )[1]
        return grad_w.view(b, *weight.shape)

    def grads(self, cap: Capture) -> Grads:
        if not self._all_grouped(cap):
            return super().grads(cap)
        own = own_trainable(cap.module)
        out: Grads = {}
        if "weight" in own:
            parts = [self.weight_grouped(cap.module, a, d) for a, d in zip(cap.inputs, cap.grad_outputs)]
            out["weight"] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
        if "bias" in own:
            out["bias"] = sum(d.flatten(2).sum(2) for d in cap.grad_outputs)
        return out

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        own = own_trainable(cap.module)
        if "weight" not in own or not cap.inputs or not self._all_grouped(cap):
            return super().grads_into(cap, out, accumulate)
        w = out["weight"]
        for k, (a, d) in enumerate(zip(cap.inputs, cap.grad_outputs)):
            g = self.weight_grouped(cap.module, a, d)
            w.add_(g) if accumulate or k else w.copy_(g)
        written = {"weight"}
        if "bias" in own:
            g = sum(d.flatten(2).sum(2) for d in cap.grad_outputs)
            out["bias"].add_(g) if accumulate else out["bias"].copy_(g)
            written.add("bias")
        return written

    def _all_grouped(self, cap: Capture) -> bool:
        return bool(cap.inputs) and all(self.grouped(cap.module, a, d) for a, d in zip(cap.inputs, cap.grad_outputs))
