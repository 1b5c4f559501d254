"""nn.MultiheadAttention and nn.TransformerEncoder (no layer rule yet): ``method="auto"``
takes torch.func and is exact, also in the sequence-first layout with T == B."""

import pytest
import torch
from torch import nn

from .harness import check_path, check_per_example


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, **kw)

    def forward(self, x):  # [B, T, 4]
        q = x if self.mha.batch_first else x.transpose(0, 1)
        out, _ = self.mha(q, q, q)
        return out if self.mha.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kw", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}], ids=["plain", "bias_kv", "zero_attn"])
def test_multihead_attention_t_equal_b(batch_first, kw):
    model = SelfAttention(batch_first, dropout=0.0, **kw)
    x = torch.randn(3, 3, 4)
    assert check_path(model, x) == "vmap"
    check_per_example(model, x, methods=("auto",))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.emb = nn.Embedding(11, 8)

    def forward(self, tokens, pad):  # [B, T], [B, T] bool
        return self.enc(self.emb(tokens), src_key_padding_mask=pad).mean(1)


def test_transformer_encoder_with_padding_mask():
    tokens = torch.randint(1, 11, (3, 5))
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    check_per_example(Encoder(), (tokens, pad), methods=("auto",))
