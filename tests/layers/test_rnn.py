"""RNN, GRU and LSTM rule: layers, directions, batch_first either way, initial state, T == B."""

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gradsift import layers

from .harness import check_path, check_per_example, probe_loss

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, phases=[Phase.generate])
KINDS = {"rnn": nn.RNN, "relu": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k), "gru": nn.GRU, "lstm": nn.LSTM}


class Head(nn.Module):
    """Recurrent layer -> loss-ready output using the sequence and the final state."""

    def __init__(self, rnn: nn.Module, hx: bool = False):
        super().__init__()
        self.rnn, self.hx = rnn, hx

    def forward(self, x):  # [B, T, in]
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        state = None
        if self.hx:
            dirs = 2 if self.rnn.bidirectional else 1
            h = x.new_ones(self.rnn.num_layers * dirs, x.shape[0], out_size(self.rnn)) * 0.1
            c = x.new_ones(self.rnn.num_layers * dirs, x.shape[0], self.rnn.hidden_size) * 0.2
            state = (h, c) if isinstance(self.rnn, nn.LSTM) else h
        out, hn = self.rnn(seq, state)
        hn = hn[0] if isinstance(hn, tuple) else hn
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        n = out_size(self.rnn)
        return out.sum(1)[:, :n] * out.sum(1)[:, -n:] + hn.sum(0)


def out_size(rnn: nn.Module) -> int:
    """Features of ``h`` per direction: ``proj_size`` or ``hidden_size``."""
    return getattr(rnn, "proj_size", 0) or rnn.hidden_size


@SETTINGS
@given(
    kind=st.sampled_from(sorted(KINDS)), b=st.integers(1, 3), t=st.integers(1, 4), layers=st.integers(1, 2),
    bidir=st.booleans(), batch_first=st.booleans(), bias=st.booleans(), hx=st.booleans(), seed=st.integers(0, 99),
)
def test_recurrent(kind, b, t, layers, bidir, batch_first, bias, hx, seed):
    torch.manual_seed(seed)
    rnn = KINDS[kind](3, 4, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias)
    check_per_example(Head(rnn, hx), torch.randn(b, t, 3), methods=("hooks",))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_t_equal_b_sequence_first(kind):
    model = Head(KINDS[kind](3, 4, num_layers=2, bidirectional=True))
    x = torch.randn(3, 3, 3)
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks", "auto"))


class PackedHead(nn.Module):
    """``(x [B, T, in], lengths [B])`` -> pack -> recurrent layer -> pad -> loss-ready output."""

    def __init__(self, rnn: nn.Module, enforce_sorted: bool, hx: bool = False):
        super().__init__()
        self.rnn, self.enforce_sorted, self.hx = rnn, enforce_sorted, hx

    def forward(self, x, lengths):
        bf = self.rnn.batch_first
        seq = x if bf else x.transpose(0, 1)
        packed = pack_padded_sequence(seq, lengths.cpu(), batch_first=bf, enforce_sorted=self.enforce_sorted)
        state = None
        if self.hx:
            dirs = 2 if self.rnn.bidirectional else 1
            h = x[:, :1, :1].transpose(0, 1).expand(self.rnn.num_layers * dirs, -1, out_size(self.rnn)) * 0.5
            c = x[:, :1, 1:2].transpose(0, 1).expand(self.rnn.num_layers * dirs, -1, self.rnn.hidden_size) * 2
            state = (h, c) if isinstance(self.rnn, nn.LSTM) else h
        out, hn = self.rnn(packed, state)
        hn = hn[0] if isinstance(hn, tuple) else hn
        out, _ = pad_packed_sequence(out, batch_first=bf, total_length=x.shape[1])
        out = out if bf else out.transpose(0, 1)
        n = out_size(self.rnn)
        return out.sum(1)[:, :n] * out.sum(1)[:, -n:] + hn.sum(0)


@SETTINGS
@given(
    kind=st.sampled_from(sorted(KINDS)), b=st.integers(1, 4), t=st.integers(1, 5), layers=st.integers(1, 2),
    bidir=st.booleans(), batch_first=st.booleans(), sort=st.booleans(), hx=st.booleans(), seed=st.integers(0, 99),
)
def test_packed(kind, b, t, layers, bidir, batch_first, sort, hx, seed):
    torch.manual_seed(seed)
    rnn = KINDS[kind](3, 4, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    lengths = torch.randint(1, t + 1, (b,))
    if sort:
        lengths = lengths.sort(descending=True).values
    model = PackedHead(rnn, enforce_sorted=sort, hx=hx)
    x = torch.randn(b, t, 3)
    check_per_example(model, (x, lengths), methods=("hooks",))
    assert check_path(model, (x, lengths)) == "hooks"


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("sort", [False, True])
def test_packed_t_equal_b_sequence_first(kind, sort):
    model = PackedHead(KINDS[kind](3, 4, num_layers=2, bidirectional=True), enforce_sorted=sort)
    x, lengths = torch.randn(3, 3, 3), torch.tensor([3, 2, 1] if sort else [2, 3, 1])
    assert check_path(model, (x, lengths)) == "hooks"
    check_per_example(model, (x, lengths), methods=("hooks", "auto"))


class HandSorted(nn.Module):
    """Lengths that are not among the inputs: the packing cannot be traced to the examples."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        packed = pack_padded_sequence(x, [x.shape[1]] * x.shape[0], batch_first=True)
        return self.rnn(packed)[1][0]


def test_untraced_packing_is_refused_with_a_reason():
    plan = layers.explain(HandSorted(), probe_loss, torch.randn(2, 3, 3), torch.randn(2, 4))
    assert plan.method == "vmap" and "pack_padded_sequence" in plan.reason


@pytest.mark.parametrize("sort", [False, True])
def test_packed_batch_of_one(sort):
    model = PackedHead(nn.LSTM(3, 4, bidirectional=True), enforce_sorted=sort)
    check_per_example(model, (torch.randn(1, 4, 3), torch.tensor([2])), methods=("hooks",))


@SETTINGS
@given(
    b=st.integers(1, 3), t=st.integers(1, 4), layers=st.integers(1, 2), bidir=st.booleans(),
    batch_first=st.booleans(), packed=st.booleans(), hx=st.booleans(), seed=st.integers(0, 99),
)
def test_lstm_proj_size(b, t, layers, bidir, batch_first, packed, hx, seed):
    torch.manual_seed(seed)
    rnn = nn.LSTM(3, 5, num_layers=layers, bidirectional=bidir, batch_first=batch_first, proj_size=2)
    if packed:
        model, x = PackedHead(rnn, enforce_sorted=False, hx=hx), (torch.randn(b, t, 3), torch.randint(1, t + 1, (b,)))
    else:
        model, x = Head(rnn, hx), torch.randn(b, t, 3)
    check_per_example(model, x, methods=("hooks",))


def test_lstm_proj_size_t_equal_b():
    model = Head(nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=3))
    x = torch.randn(3, 3, 3)
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks", "auto"))


def test_dropout_between_layers_in_training_is_refused_with_a_reason():
    model = Head(nn.GRU(3, 4, num_layers=2, dropout=0.5))
    plan = layers.explain(model, probe_loss, torch.randn(2, 3, 3), torch.randn(2, 4))
    assert plan.method == "vmap" and "dropout" in plan.layers["rnn"] and "eval" in plan.layers["rnn"]
    model.eval()  # no dropout in eval mode: the rule applies
    check_per_example(model, torch.randn(2, 3, 3), methods=("hooks",))


class Upstream(nn.Module):
    """Linear -> LSTM (its initial state computed from the input too): the recording's own
    LSTM backward pass feeds the Linear, and keeps the LSTM's gate gradients."""

    def __init__(self, batch_first: bool, **kw):
        super().__init__()
        self.inp, self.init = nn.Linear(3, 3), nn.Linear(3, 4)
        self.rnn = nn.LSTM(3, 4, batch_first=batch_first, **kw)

    def forward(self, x):  # [B, T, 3]
        seq = self.inp(x)
        seq = seq if self.rnn.batch_first else seq.transpose(0, 1)
        dirs = 2 if self.rnn.bidirectional else 1
        c = self.init(x[:, 0]).unsqueeze(0).expand(self.rnn.num_layers * dirs, -1, -1)
        h = c[..., : out_size(self.rnn)] * 0.5
        out, (hn, cn) = self.rnn(seq, (h.contiguous(), c.contiguous()))
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return out.sum(1)[:, :2] * hn.sum(0)[:, :2] + cn.sum(0)[:, :2]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 2}], ids=["1", "2x2", "proj"])
def test_lstm_after_a_layer_t_equal_b(batch_first, kw):
    torch.manual_seed(0)
    model, x = Upstream(batch_first, **kw), torch.randn(3, 3, 3)
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks",))


def test_untraced_packing_error_names_the_layer_and_the_fix():
    import gradsift as gs

    with pytest.raises(gs.UnsupportedModelError, match=r"layer 'rnn'.*lengths"):
        gs.per_example_gradients(HandSorted(), probe_loss, torch.randn(2, 3, 3), torch.randn(2, 4))
