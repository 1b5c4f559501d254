"""nn.MultiheadAttention rule (every option, either batch layout, T == B) and
nn.TransformerEncoder with a padding mask, on the hooks path and equal to the loop."""

import pytest
import torch
from torch import nn

from gradsift import layers

from .harness import check_path, check_per_example, probe_loss


class Attend(nn.Module):
    """``(x [B, T, 4], ctx [B, S, c], pad [B, S] bool)`` -> MHA(x, ctx, ctx) -> ``[B, T, 4]``."""

    def __init__(self, batch_first: bool, weights: bool = False, mask: str | None = None, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, dropout=0.0, **kw)
        self.weights, self.mask = weights, mask

    def forward(self, x, ctx, pad):
        q, kv = (x, ctx) if self.mha.batch_first else (x.transpose(0, 1), ctx.transpose(0, 1))
        kw = {}
        if self.mask == "padding":
            kw["key_padding_mask"] = pad
        elif self.mask == "float":
            kw["key_padding_mask"] = pad.to(x.dtype) * -3.0
        elif self.mask == "causal":
            kw["attn_mask"] = torch.ones(x.shape[1], ctx.shape[1], dtype=torch.bool).triu(1)
        elif self.mask == "per-example":  # [B * heads, T, S], from the padding mask
            kw["attn_mask"] = pad[:, None, None, :].expand(-1, 2, x.shape[1], -1).reshape(-1, x.shape[1], pad.shape[1])
        out, w = self.mha(q, kv, kv, need_weights=self.weights, **kw)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        return out * w.sum(-1, keepdim=True) if self.weights else out


def data(b, t, s, c=4):
    pad = torch.zeros(b, s, dtype=torch.bool)
    if b:
        pad[-1, s // 2 + 1 :] = True  # the last example is padded; every example keeps a key
    return torch.randn(b, t, 4), torch.randn(b, s, c), pad


OPTIONS = {
    "plain": {}, "bias_kv": {"add_bias_kv": True}, "zero_attn": {"add_zero_attn": True},
    "kdim_vdim": {"kdim": 3, "vdim": 3}, "no_bias": {"bias": False},
    "all": {"add_bias_kv": True, "add_zero_attn": True, "kdim": 3, "vdim": 3},
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_t_equal_b(batch_first, option):
    """T == S == B == 3, so only the traced batch axis tells the layouts apart."""
    torch.manual_seed(0)
    kw = OPTIONS[option]
    model = Attend(batch_first, mask="padding", **kw)
    x = data(3, 3, 3, c=kw.get("kdim", 4))
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks", "auto"))


@pytest.mark.parametrize("mask", [None, "padding", "float", "causal", "per-example"])
@pytest.mark.parametrize("weights", [False, True])
def test_masks_and_weights(mask, weights):
    torch.manual_seed(1)
    model = Attend(False, weights=weights, mask=mask)
    x = data(4, 3, 5)
    assert check_path(model, x) == "hooks"
    check_per_example(model, x, methods=("hooks",))


@pytest.mark.parametrize("b", [0, 1])
def test_batch_of_zero_and_one(b):
    # torch's MultiheadAttention cannot take a padding mask of an empty batch
    check_per_example(Attend(True, mask="padding" if b else None, add_bias_kv=True), data(b, 3, 4), methods=("hooks",))


def test_dropout_in_training_is_refused_with_a_reason():
    model = Attend(True)
    model.mha.dropout = 0.1
    plan = layers.explain(model, probe_loss, data(2, 3, 3), torch.randn(2, 3, 4))
    assert plan.method == "vmap" and "dropout" in plan.layers["mha"]
    model.eval()
    assert layers.explain(model, probe_loss, data(2, 3, 3), torch.randn(2, 3, 4)).method == "hooks"


class Encoder(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.emb = nn.Embedding(11, 8)

    def forward(self, tokens, pad):  # [B, T], [B, T] bool
        h = self.emb(tokens)
        if self.enc.layers[0].self_attn.batch_first:
            return self.enc(h, src_key_padding_mask=pad).mean(1)
        return self.enc(h.transpose(0, 1), src_key_padding_mask=pad).mean(0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transformer_encoder_with_padding_mask(batch_first, train):
    torch.manual_seed(0)
    tokens = torch.randint(1, 11, (3, 3))
    pad = torch.zeros(3, 3, dtype=torch.bool)
    pad[1, 2:] = True
    model = Encoder(batch_first).train(train)
    assert check_path(model, (tokens, pad)) == "hooks"
    check_per_example(model, (tokens, pad), methods=("hooks", "auto"))


class SelfAttention(nn.Module):
    """``mha(x, x, x, **options)``'s output, ``[B, T, 6]``."""

    def __init__(self, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.options = options

    def forward(self, x):
        return self.mha(x, x, x, **self.options)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_recording_keeps_the_projection_gradients(batch_first, monkeypatch):
    """The recording runs the attention written out and takes its projections' gradients in
    its backward pass: norms, weighted sums and per-example gradients need no second pass
    through it, and its output is the layer's own; so for a first layer on constant inputs."""
    from gradsift import layers
    from gradsift.layers.attention import AttentionRule

    torch.manual_seed(0)
    model = Encoder(batch_first).eval()
    tokens = torch.randint(1, 11, (4, 5))
    pad = torch.zeros(4, 5, dtype=torch.bool)
    pad[1, 3:] = True
    y = torch.randn(4, 8)
    loss = lambda out, t: (out - t).square().sum(1)  # noqa: E731
    with torch.no_grad():
        want = model(tokens, pad)
    calls = []
    real = AttentionRule._attend
    monkeypatch.setattr(AttentionRule, "_attend", lambda self, *a, **k: calls.append(k["detach"]) or real(self, *a, **k))
    rec = layers.record(model, loss, (tokens, pad), y)
    torch.testing.assert_close(rec.outputs, want, atol=1e-6, rtol=1e-5)
    assert calls == [False, False]  # each layer once, in the recording
    for cap in rec.captures.values():
        layers.layer_norms_sq(cap), layers.layer_weighted_sum(cap, torch.rand(4)), layers.layer_grads(cap)
    assert calls == [False, False]

    calls.clear()
    rec = layers.record(SelfAttention(), lambda out, t: (out - t).square().sum((1, 2)), torch.randn(4, 5, 6),
                        torch.randn(4, 5, 6))
    layers.layer_norms_sq(rec.captures["mha"]), layers.layer_weighted_sum(rec.captures["mha"], torch.rand(4))
    assert calls == [False]


def test_a_causal_hint_without_a_mask_gets_the_layers_own_error():
    from gradsift import layers

    causal = SelfAttention(is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="attn_mask"):
        layers.record(causal, lambda out, t: (out - t).square().sum((1, 2)), torch.randn(3, 4, 6), torch.randn(3, 4, 6))
