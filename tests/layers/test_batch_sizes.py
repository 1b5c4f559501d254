"""B = 0 and B = 1 through the harness, for one layer of each rule file."""

import pytest
import torch
from torch import nn

from .harness import check_per_example

LAYERS = {
    "linear": (lambda: nn.Linear(3, 2), lambda b: torch.randn(b, 2, 3)),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2), lambda b: torch.randn(b, 2, 3, 3, 3)),
    "embedding": (lambda: nn.Embedding(7, 3), lambda b: torch.randint(0, 7, (b, 4))),
    "layernorm": (lambda: nn.LayerNorm(3), lambda b: torch.randn(b, 2, 3)),
    "gru": (lambda: nn.GRU(3, 2, batch_first=True), lambda b: torch.randn(b, 2, 3)),
}


class First(nn.Module):
    """Keeps the first output of a recurrent layer."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("b", [0, 1])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batch_of_zero_and_one(name, b):
    make, data = LAYERS[name]
    model = First(make())
    methods = ("hooks",) if name == "gru" else ("hooks", "vmap")
    ref = check_per_example(model, data(b), methods=methods)
    assert all(g.shape[0] == b for g in ref.values())
