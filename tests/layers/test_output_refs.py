"""A recording holds each layer output by its autograd edge, not its values: the output's
memory goes when the network is done with it, and in-place changes of it are harmless."""

import weakref

import pytest
import torch
from torch import nn

from gradsift import layers
from gradsift.layers.record import NotHookable, OutputRef

from .harness import check_per_example
from .test_models import CE


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("replayed", [False, True], ids=["traced", "replayed"])
def test_a_pre_activation_is_freed_once_its_relu_ran(replayed):
    """As in a plain forward pass: ReLU keeps its result, not its input, so the first
    Linear's output has no owner left once the second Linear runs."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    layers.forget_traces(model)
    if replayed:
        layers.record(model, CE, x, y)  # traced: the next pass of this signature replays
    seen: dict[str, object] = {}
    alive_at_second_linear: list[bool] = []
    h1 = model[0].register_forward_hook(lambda m, a, out: seen.update(pre=weakref.ref(out)))
    h2 = model[2].register_forward_pre_hook(lambda m, a: alive_at_second_linear.append(seen["pre"]() is not None))
    try:
        rec = layers.record(model, CE, x, y)
    finally:
        h1.remove()
        h2.remove()
    assert alive_at_second_linear == [False]
    assert [len(c.grad_outputs) for c in rec.captures.values()] == [1, 1, 1]


def test_in_place_change_of_an_output_and_of_a_whole_view_output():
    """``Linear`` on ``[B, T, K]`` returns a view of its whole matmul result; an in-place
    ReLU on it, and on a plain 2-D output, leaves each layer's output gradient as it was
    when the layer returned (checked against the float64 loop of single examples)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Linear(4, 6)
            self.flat = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):  # [B, T, 4]
            h = self.seq(x).relu_().mean(1)  # in place on a view output
            return self.head(self.flat(h).relu_())  # in place on a 2-D output

    torch.manual_seed(1)
    check_per_example(Net(), torch.randn(5, 3, 4), torch.randint(0, 3, (5,)), loss_fn=CE, methods=("hooks",))


def test_output_ref_of_a_partial_view_holds_the_tensor():
    base = torch.randn(4, 6, requires_grad=True) * 1.0
    assert OutputRef.of(base[:, :3]) is None  # part of a tensor: held as a tensor
    whole = OutputRef.of(base.view(4, 2, 3))
    assert whole is not None and whole.shape == (4, 2, 3)
    assert OutputRef.of(torch.randn(3)).requires_grad is False


def test_a_layer_input_changed_in_place_afterwards_is_refused():
    """The capture of the second layer would hold the changed values: refused, not silently
    wrong."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            out = self.b(h)
            h.mul_(2.0)
            return out

    model = Net()
    with pytest.raises(NotHookable, match="modified in place after the layer used it"):
        layers.record(model, CE, torch.randn(3, 4), torch.randint(0, 2, (3,)))
