"""A recording whose signature was traced replays without the trace, and equals a traced one."""

import copy
import importlib

import pytest
import torch
from torch import nn

from gradsift import layers

record_module = importlib.import_module("gradsift.layers.record")  # the module, not the function
from .harness import check_per_example
from .test_models import CE, TextModel


class NoTrace:
    """Stands in for BatchTrace where a test proves that no trace runs."""

    def __init__(self, *a, **k):
        raise AssertionError("the batch trace ran")


def counting_trace(monkeypatch) -> list[int]:
    runs = [0]
    real = record_module.BatchTrace

    class Counting(real):
        def __init__(self, *a, **k):
            runs[0] += 1
            super().__init__(*a, **k)

    monkeypatch.setattr(record_module, "BatchTrace", Counting)
    return runs


def assert_same(a: layers.Recording, b: layers.Recording) -> None:
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
    assert a.captures.keys() == b.captures.keys()
    for name, ca in a.captures.items():
        cb = b.captures[name]
        assert len(ca.inputs) == len(cb.inputs) and len(ca.grad_outputs) == len(cb.grad_outputs), name
        for u, v in zip([*ca.inputs, *ca.grad_outputs], [*cb.inputs, *cb.grad_outputs]):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3, groups=2),
                         nn.GroupNorm(3, 6), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(24, 3))


class SeqFirstLinear(nn.Module):
    """A Linear on ``[T, B, d]`` (batch on axis 1) where T == B."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).transpose(0, 1).sum(1)


class SharedPositions(nn.Module):
    """Token, position (``[1, T]`` ids from a buffer) and segment (a ``[1, T]`` buffer expanded
    to ``[B, T]``) embeddings: layer inputs shared by all examples, as in BERT."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.seg = nn.Embedding(11, 6), nn.Embedding(9, 6), nn.Embedding(2, 6)
        self.register_buffer("positions", torch.arange(9)[None])
        self.register_buffer("segments", torch.zeros(1, 9, dtype=torch.long))
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        t = ids.shape[1]
        segments = self.segments[:, :t].expand(ids.shape[0], t)
        h = self.tok(ids) + self.pos(self.positions[:, :t]) + self.seg(segments)
        return self.head(torch.tanh(h).mean(1))


MODELS = {
    "embeddings of inputs shared by all examples": (SharedPositions, lambda: torch.randint(0, 11, (5, 7))),
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), lambda: torch.randn(5, 6)),
    "text (shared layer, in-place relu)": (TextModel, lambda: torch.randint(0, 11, (6, 9))),
    "cnn (in-place relu: outputs copied)": (cnn, lambda: torch.randn(5, 1, 9, 9)),
    "sequence-first, T == B": (SeqFirstLinear, lambda: torch.randn(4, 4, 5)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_replay_equals_trace_and_skips_it(name, monkeypatch):
    torch.manual_seed(0)
    make, data = MODELS[name]
    model, x = make(), data()
    y = torch.randint(0, 3, (x.shape[0],))
    traced = layers.record(model, CE, x, y)
    monkeypatch.setattr(record_module, "BatchTrace", NoTrace)
    assert_same(traced, layers.record(model, CE, x, y))
    # and against the float64 loop (the harness records several times: trace, then replays)
    monkeypatch.undo()
    check_per_example(model, x, y, loss_fn=CE, methods=("hooks",))


def test_new_signature_traces(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    runs = counting_trace(monkeypatch)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    layers.record(model, CE, x, y)
    layers.record(model, CE, x, y)
    assert runs[0] == 1
    layers.record(model, CE, x[:4], y[:4])  # another batch size
    model.eval()  # another mode
    layers.record(model, CE, x, y)
    layers.record(model, lambda o, t: CE(o, t) * 2, x, y)  # another loss function
    model[0].weight.requires_grad_(False)  # other trainable parameters
    layers.record(model, CE, x, y)
    assert runs[0] == 5
    layers.forget_traces(model)
    layers.record(model, CE, x, y)
    assert runs[0] == 6


def test_retraces_every_so_often(monkeypatch):
    monkeypatch.setattr(record_module, "RETRACE_EVERY", 3)
    runs = counting_trace(monkeypatch)
    model = nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    for _ in range(7):
        layers.record(model, CE, x, y)
    assert runs[0] == 3  # calls 1, 4 (3rd use), 7 (6th use)


class Branchy(nn.Module):
    """Calls its layer once or twice, as an attribute (outside the signature) says."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.twice = False

    def forward(self, x):
        h = self.lin(x)
        if self.twice:
            h = self.lin(torch.tanh(h))
        return self.head(h)


def test_other_calls_fall_back_to_the_trace(monkeypatch):
    torch.manual_seed(0)
    model, x, y = Branchy(), torch.randn(5, 4), torch.randint(0, 2, (5,))
    layers.record(model, CE, x, y)
    runs = counting_trace(monkeypatch)
    model.twice = True
    rec = layers.record(model, CE, x, y)
    assert runs[0] == 1 and len(rec.captures["lin"].inputs) == 2
    check_per_example(copy.deepcopy(model), x, y, loss_fn=CE, methods=("hooks",))


def test_signatures_kept_per_model_are_bounded(monkeypatch):
    """A new loss function every step (a lambda in the loop) must not grow the cache."""
    monkeypatch.setattr(record_module, "MAX_SIGNATURES", 3)
    runs = counting_trace(monkeypatch)
    model, x, y = nn.Linear(4, 2), torch.randn(3, 4), torch.randint(0, 2, (3,))
    losses = [lambda o, t, k=k: CE(o, t) * k for k in range(1, 6)]
    for loss in losses:
        layers.record(model, loss, x, y)
    assert runs[0] == 5
    for loss in losses[2:]:  # the newest three are kept: replayed
        layers.record(model, loss, x, y)
    assert runs[0] == 5
    layers.record(model, losses[0], x, y)  # the oldest were dropped: traced again
    assert runs[0] == 6


def test_the_cache_does_not_keep_a_model_alive(monkeypatch):
    """A loss bound to the model (a method) refers to it; the cache must hold it weakly."""
    import gc
    import weakref

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

        def loss(self, out, t):
            return CE(out, t)

    model = WithLoss()
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    runs = counting_trace(monkeypatch)
    layers.record(model, model.loss, x, y)
    layers.record(model, model.loss, x, y)  # a new bound-method object, the same loss: replayed
    assert runs[0] == 1
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
