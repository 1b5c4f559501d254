"""``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``: elementwise affine after normalizing.

Example ``i``'s gradients are ``sum d_i * xhat_i`` (weight) and ``sum d_i`` (bias), summed
over the positions a parameter is shared across, with ``xhat`` the normalized input.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Capture, Grads, LayerRule, own_trainable, register_layer_rule


class AffineNormRule(LayerRule):
    """A normalization followed by an elementwise affine map; subclasses give :meth:`normalized`."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        """``xhat``, the normalized input, shaped as ``a``."""
        raise NotImplementedError

    def per_example(self, module: nn.Module, t: Tensor, param: Tensor) -> Tensor:
        """Sum ``t [B, ...]`` over the positions sharing each parameter entry -> ``[B, *param.shape]``."""
        return t.reshape(t.shape[0], -1, *param.shape).sum(1)

    def grads(self, cap: Capture) -> Grads:
        m = cap.module
        own = own_trainable(m)
        out: Grads = {}
        for a, d in zip(cap.inputs, cap.grad_outputs):
            terms = {}
            if "weight" in own:
                terms["weight"] = d * self.normalized(m, a).to(d.dtype)
            if "bias" in own:
                terms["bias"] = d
            for n, t in terms.items():
                g = self.per_example(m, t, own[n])
                out[n] = out[n] + g if n in out else g
        return out


@register_layer_rule(nn.LayerNorm)
class LayerNormRule(AffineNormRule):
    batch_axis_free = True

    def feature_axes_of(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)


@register_layer_rule(nn.RMSNorm)
class RMSNormRule(AffineNormRule):
    batch_axis_free = True

    def feature_axes_of(self, module: nn.Module) -> int:
        return len(module.normalized_shape)

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        return F.rms_norm(a, module.normalized_shape, None, module.eps)


@register_layer_rule(nn.GroupNorm)
class GroupNormRule(AffineNormRule):
    """``nn.GroupNorm`` on ``[B, C, ...]``: parameters are per channel (axis 1)."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        return F.group_norm(a, module.num_groups, None, None, module.eps)

    def per_example(self, module: nn.Module, t: Tensor, param: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


@register_layer_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(GroupNormRule):
    """``nn.InstanceNorm*d(affine=True)`` on ``[B, C, ...]``; with running statistics only
    in eval mode (in training mode those mix the batch and the engine refuses them)."""

    def supports(self, module: nn.Module) -> bool:
        return not (module.track_running_stats and module.training)

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        if module.track_running_stats:
            return F.instance_norm(a, module.running_mean, module.running_var, None, None,
                                   use_input_stats=False, eps=module.eps)
        return F.instance_norm(a, None, None, None, None, use_input_stats=True, eps=module.eps)
