"""RNN, GRU and LSTM rule: layers, directions, batch_first either way, initial state, T == B."""

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from .harness import check_path, check_per_example

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
            h = x.new_ones(self.rnn.num_layers * dirs, x.shape[0], self.rnn.hidden_size) * 0.1
            state = (h, h * 2) if isinstance(self.rnn, nn.LSTM) else h
        out, hn = self.rnn(seq, state)
        hn = hn[0] if isinstance(hn, tuple) else hn
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return out.sum(1)[:, : self.rnn.hidden_size] * out.sum(1)[:, -self.rnn.hidden_size :] + hn.sum(0)


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
