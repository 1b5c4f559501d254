"""A user registers a rule for their own layer; the fast path then covers it."""

import re

import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift import layers
from gradsift.layers import LayerRule, register_layer_rule

from .harness import check_per_example


class Scale(nn.Module):
    """``y = x * w`` with ``w`` of shape ``[d]``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.weight


class Unregistered(Scale):
    """A subclass: rules match exact types only."""


@register_layer_rule(Scale)
class ScaleRule(LayerRule):
    def grads(self, cap):
        g = sum((a * d).reshape(len(a), -1, a.shape[-1]).sum(1)
                for a, d in zip(cap.inputs, cap.grad_outputs))
        return {"weight": g}


def test_custom_rule_matches_loop_and_is_used():
    model = nn.Sequential(nn.Linear(4, 3), Scale(3), nn.Tanh(), Scale(3))
    assert layers.unsupported_layers(model) == []
    assert isinstance(layers.rule_for(model[1]), ScaleRule)
    check_per_example(model, torch.randn(6, 2, 4))


def test_unregistered_subclass_falls_back():
    model = nn.Sequential(nn.Linear(4, 3), Unregistered(3))
    assert layers.unsupported_layers(model) == ["1"]
    with pytest.raises(gs.UnsupportedModelError, match="register_layer_rule"):
        check_per_example(model, torch.randn(5, 4), methods=("hooks",))
    check_per_example(model, torch.randn(5, 4), methods=("auto",))


def test_register_checks_its_arguments():
    with pytest.raises(TypeError):
        register_layer_rule(42)
    with pytest.raises(TypeError):
        register_layer_rule(Scale)(object)


def test_docstring_example_runs():
    doc = layers.__doc__
    block = doc[doc.index("    import torch"):]
    code = "\n".join(line[4:] for line in block.splitlines())
    code = code.replace("class Scale(", "class DocScale(").replace("(Scale)", "(DocScale)")
    code = re.sub(r"\bScale\(3\)", "DocScale(3)", code)
    namespace: dict = {}
    exec(compile(code, "layers-docstring", "exec"), namespace)
    assert namespace["grads"]["1.weight"].shape == (8, 3)
