"""Per-example gradients equal a loop of single-example backward passes."""

import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift.engine import per_example

CE = nn.CrossEntropyLoss(reduction="none")


def loop_grads(model, loss_fn, x, y):
    out = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


class EmbedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):  # [B, T] -> [B, 3]
        return self.head(self.ln(self.emb(tokens)).mean(1))


def cases():
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    ln = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    return [
        ("mlp", mlp, torch.randn(9, 5)),
        ("cnn", cnn, torch.randn(9, 1, 6, 6)),
        ("embedding", EmbedModel(), torch.randint(0, 20, (9, 4))),
        ("layernorm", ln, torch.randn(9, 5)),
    ]


@pytest.mark.parametrize("name,model,x", cases(), ids=[c[0] for c in cases()])
@pytest.mark.parametrize("chunk_size", [None, 2, 4])
def test_gradients_equal_loop(name, model, x, chunk_size):
    y = torch.randint(0, 3, (len(x),))
    ref = loop_grads(model, CE, x, y)
    got = gs.per_example_gradients(model, CE, x, y, chunk_size=chunk_size)
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].shape == (len(x), *dict(model.named_parameters())[n].shape)
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4)
    norms = gs.per_example_norms(model, CE, x, y, chunk_size=chunk_size)
    ref_norm = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    torch.testing.assert_close(norms, ref_norm, atol=1e-5, rtol=1e-4)
    layer = gs.per_example_norms(model, CE, x, y, per_layer=True)
    for n in ref:
        torch.testing.assert_close(layer[n], ref[n].flatten(1).norm(dim=1), atol=1e-5, rtol=1e-4)


def test_losses_and_outputs():
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    pe = per_example(model, CE, x, y)
    torch.testing.assert_close(pe.losses, CE(model(x), y).detach())
    torch.testing.assert_close(pe.outputs, model(x).detach())
    torch.testing.assert_close(gs.per_example_losses(model, CE, x, y), CE(model(x), y).detach())


def test_frozen_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    got = gs.per_example_gradients(model, CE, x, y)
    assert "0.weight" not in got and set(got) == {"0.bias", "2.weight", "2.bias"}
    ref = loop_grads(model, CE, x, y)
    for n in got:
        torch.testing.assert_close(got[n], ref[n])


def test_eval_mode_batchnorm_uses_buffers():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model(torch.randn(32, 4))  # populate running stats
    model.eval()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    got = gs.per_example_gradients(model, CE, x, y)
    ref = loop_grads(model, CE, x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with pytest.raises(gs.UnsupportedModelError, match=r"'1'.*BatchNorm1d.*GroupNorm.*eval"):
        gs.per_example_gradients(model, CE, torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_bad_inputs():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="batch size"):
        gs.per_example_gradients(model, CE, torch.randn(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one loss per example"):
        gs.per_example_gradients(model, lambda o, t: o.sum(0), torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="per-example losses"):
        gs.per_example_losses(model, nn.CrossEntropyLoss(), torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        gs.per_example_gradients(model, CE, torch.randn(3, 4), torch.zeros(3, dtype=torch.long), chunk_size=0)


def test_empty_batch():
    model = nn.Linear(4, 2)
    g = gs.per_example_gradients(model, CE, torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert g["weight"].shape == (0, 2, 4)


class TwoInputs(nn.Module):
    """``model(x, scale=None, mask=...)``: several inputs, some optional."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.emb = nn.Embedding(7, 3)

    def forward(self, x, tokens, mask=None):
        h = self.lin(x) + self.emb(tokens).mean(1)
        return h if mask is None else h * mask.unsqueeze(1)


@pytest.mark.parametrize("method", ["hooks", "vmap"])
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_tuple_and_dict_inputs(form, method):
    model = TwoInputs()
    x, tokens, mask = torch.randn(5, 4), torch.randint(0, 7, (5, 3)), (torch.rand(5) > 0.3).float()
    y = torch.randint(0, 3, (5,))
    inputs = (x, tokens, mask) if form == "tuple" else {"x": x, "tokens": tokens, "mask": mask}
    ref = {n: [] for n, _ in model.named_parameters()}
    for i in range(5):
        model.zero_grad()
        CE(model(x[i : i + 1], tokens[i : i + 1], mask[i : i + 1]), y[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            ref[n].append(p.grad.clone())
    got = gs.per_example_gradients(model, CE, inputs, y, method=method, chunk_size=2)
    for n, v in ref.items():
        torch.testing.assert_close(got[n], torch.stack(v), atol=1e-5, rtol=1e-4)
    norms = gs.per_example_norms(model, CE, inputs, y, method=method)
    torch.testing.assert_close(norms, torch.sqrt(sum(torch.stack(v).flatten(1).square().sum(1) for v in ref.values())))
    torch.testing.assert_close(gs.per_example_losses(model, CE, inputs, y), CE(model(x, tokens, mask), y).detach())
    pe = per_example(model, CE, inputs, y, method=method)
    torch.testing.assert_close(pe.outputs, model(x, tokens, mask).detach())


def test_inputs_must_share_the_batch():
    with pytest.raises(ValueError, match="batch size"):
        gs.per_example_gradients(TwoInputs(), CE, (torch.randn(5, 4), torch.randint(0, 7, (4, 3))),
                                 torch.zeros(5, dtype=torch.long))


def test_loss_helpers():
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(gs.losses.cross_entropy(logits, y), CE(logits, y))
    torch.testing.assert_close(gs.losses.cross_entropy((logits,), y), CE(logits, y))
    seq, tok = torch.randn(2, 4, 5), torch.tensor([[1, 2, -100, 3], [4, -100, -100, -100]])
    got = gs.losses.sequence_cross_entropy(seq, tok)
    for i in range(2):
        keep = tok[i] != -100
        torch.testing.assert_close(got[i], nn.functional.cross_entropy(seq[i][keep], tok[i][keep]))
    shifted = gs.losses.sequence_cross_entropy(seq, tok, shift=True)
    torch.testing.assert_close(shifted, gs.losses.sequence_cross_entropy(seq[:, :-1], tok[:, 1:]))


def test_instance_norm_with_running_stats_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(gs.UnsupportedModelError, match=r"'1'.*InstanceNorm1d.*track_running_stats=False"):
        gs.per_example_gradients(model, CE, torch.randn(3, 2, 5), torch.zeros(3, dtype=torch.long))
    model.eval()
    gs.per_example_gradients(model, CE, torch.randn(3, 2, 5), torch.zeros(3, dtype=torch.long))


class Branchy(nn.Module):
    """Python control flow on tensor values: torch.func cannot map over it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = self.lin(x) * self.scale
        return h if bool(h.sum() > 0) else -h


def test_torch_func_failures_are_gradsift_errors():
    with pytest.raises(gs.UnsupportedModelError, match="branches on tensor values.*register_layer_rule"):
        gs.per_example_gradients(Branchy(), CE, torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


def test_fallback_reason_is_logged_and_explained(caplog):
    model = nn.Sequential(nn.Linear(4, 3))
    seq_mixing = lambda out, y: CE(out, y) + out.sum(0).sum() * 0  # noqa: E731 - mixes the batch
    x, y = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    with caplog.at_level("DEBUG", logger="gradsift.engine"):
        gs.per_example_gradients(model, seq_mixing, x, y)
    assert "hooks path refused" in caplog.text and "losses" in caplog.text
    plan = gs.layers.explain(model, seq_mixing, x, y)
    assert plan.method == "vmap" and "sum" in plan.reason
    assert gs.layers.explain(model, CE, x, y).method == "hooks"
    assert "0: hooks (LinearRule)" in str(gs.layers.explain(model))
