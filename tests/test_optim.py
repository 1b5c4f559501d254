import numpy as np
import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift.data import load_digits
from gradsift.errors import SpecError
from gradsift.models import mlp
from gradsift.optim import available_optimizers, optimizer_class, optimizer_from_spec

pytest.importorskip("pytorch_optimizer")

# torch.optim first, then the pytorch-optimizer package; each through a gradsift aggregator
MATRIX = [
    ("sgd:lr=0.3,momentum=0.9", "SGD", "mean"),
    ("adam:lr=2e-2", "Adam", "winsorize:c=1"),
    ("adamw:lr=1e-2,weight_decay=0.01", "AdamW", "clip:max_norm=1+mean"),
    ("diffgrad:lr=3e-2", "DiffGrad", "m3"),
    ("adamp:lr=1e-2", "AdamP", "mean"),
    ("lion:lr=1e-2", "Lion", "winsorize:c=1"),
    ("ademamix:lr=1e-2", "AdEMAMix", "rm3"),
    ("madgrad:lr=3e-2", "MADGRAD", "clip:max_norm=1+mean"),
]


@pytest.fixture(scope="module")
def digits_small():
    tr, _ = load_digits()
    return tr.subset(np.arange(160))


@pytest.mark.parametrize("spec,cls,agg", MATRIX)
def test_every_optimizer_trains_through_gradsift(digits_small, spec, cls, agg):
    torch.manual_seed(0)
    model = mlp(64, 10, width=16)
    x, y = digits_small.tensors()
    initial = gs.train.evaluate(model, nn.CrossEntropyLoss(reduction="none"), x, y)["loss"]
    res = gs.fit(model, digits_small, aggregator=agg, optimizer=spec, epochs=3, batch_size=20)
    assert type(res.trainer.optimizer).__name__ == cls
    assert res.history.train_loss.iloc[-1] < initial - 0.3


def test_names_resolve_torch_first_then_pytorch_optimizer():
    assert optimizer_class("AdamW") is torch.optim.AdamW
    assert optimizer_class("ad-em-amix".replace("-", "")).__module__.startswith("pytorch_optimizer")
    names = available_optimizers()
    assert "sgd" in names["torch"] and "lion" in names["pytorch_optimizer"]
    p = [nn.Parameter(torch.zeros(2))]
    opt = optimizer_from_spec("adamp:lr=1e-3,betas=(0.8,0.99)", p)
    assert opt.defaults["betas"] == (0.8, 0.99)
    with pytest.raises(SpecError, match="unknown optimizer 'nope'"):
        optimizer_from_spec("nope", p)
    with pytest.raises(SpecError, match="bad options"):
        optimizer_from_spec("adam:lr=1e-3,bogus=1", p)
