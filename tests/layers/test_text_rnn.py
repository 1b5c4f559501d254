"""LSTM/GRU text classifiers, padded and packed, on the hooks path and equal to the loop."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .harness import check_path, check_per_example

CE = nn.CrossEntropyLoss(reduction="none")


class TextRNN(nn.Module):
    """``{"tokens": [B, T], "lengths": [B]}`` -> Embedding -> 2-layer bidirectional LSTM/GRU
    (packed, or padded with a mean over the real tokens) -> Linear -> ``[B, 3]``."""

    def __init__(self, kind: str, packed: bool):
        super().__init__()
        self.packed = packed
        self.emb = nn.Embedding(20, 5, padding_idx=0)
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(5, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens, lengths):
        x = self.emb(tokens)
        if self.packed:
            _, h = self.rnn(pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False))
            h = h[0] if isinstance(h, tuple) else h
            return self.head(torch.cat([h[-2], h[-1]], 1))
        out, _ = self.rnn(x)
        mask = (tokens != 0).unsqueeze(-1).to(out.dtype)
        return self.head((out * mask).sum(1) / lengths.unsqueeze(1).to(out.dtype))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_text_classifier(kind, packed):
    torch.manual_seed(0)
    b, t = 5, 7
    lengths = torch.tensor([7, 3, 5, 1, 7])
    tokens = torch.randint(1, 20, (b, t)) * (torch.arange(t) < lengths.unsqueeze(1))
    model, x, y = TextRNN(kind, packed), {"tokens": tokens, "lengths": lengths}, torch.randint(0, 3, (b,))
    assert check_path(model, x, y, loss_fn=CE) == "hooks"
    check_per_example(model, x, y, loss_fn=CE, methods=("hooks", "auto"))
