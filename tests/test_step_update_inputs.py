"""step_update takes inputs as a tensor, a tuple or a dict (issue 12), on every path."""

import pytest
import torch
from torch import nn

import gradsift as gs


class TwoInputs(nn.Module):
    """``forward(x=[B, 4], z=[B, 3]) -> [B, 3]``: the same as ``Sequential`` on ``cat(x, z)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x, z):
        return self.net(torch.cat([x, z], 1))


@pytest.mark.parametrize("spec", ["mean", "m3", "winsorize:c=1", "clip:max_norm=0.5+mean", "rm3"])
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_tuple_and_dict_inputs_equal_the_tensor_form(spec, form):
    torch.manual_seed(0)
    model = TwoInputs()
    x, z, y = torch.randn(9, 4), torch.randn(9, 3), torch.randint(0, 3, (9,))
    loss = nn.CrossEntropyLoss(reduction="none")
    inputs = (x, z) if form == "tuple" else {"x": x, "z": z}
    got = gs.aggregate.step_update(model, loss, inputs, y, spec)
    flat = model.net
    want = gs.aggregate.step_update(flat, loss, torch.cat([x, z], 1), y, spec)
    assert got.losses.shape == (9,)
    for name, u in want.update.items():
        torch.testing.assert_close(got.update[f"net.{name}"], u)


def test_batch_mismatch_is_a_clear_error():
    model = TwoInputs()
    with pytest.raises(ValueError, match="batch size"):
        gs.aggregate.step_update(model, nn.CrossEntropyLoss(reduction="none"),
                                 (torch.randn(4, 4), torch.randn(5, 3)), torch.zeros(4, dtype=torch.long), "m3")
