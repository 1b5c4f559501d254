"""Workspaces (gradsift.workspace): per-example results written into reused buffers are
never overwritten while a caller holds them, unless the caller opted in with ``workspace=``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsift as gs
from gradsift import workspace as W
from tests.layers.harness import loop_reference

CE = nn.CrossEntropyLoss(reduction="none")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(seed: int, b: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g)


def _ptr(grads: dict) -> tuple:
    return tuple(g.data_ptr() for g in grads.values())


@pytest.fixture(autouse=True)
def _fresh_pool():
    W.release()
    yield
    W.release()


def test_kept_results_are_not_overwritten_by_the_next_call():
    model = _model()
    x1, y1 = _batch(1)
    x2, y2 = _batch(2)
    g1 = gs.per_example_gradients(model, CE, x1, y1)
    saved = {n: g.clone() for n, g in g1.items()}
    g2 = gs.per_example_gradients(model, CE, x2, y2)
    for n in g1:
        torch.testing.assert_close(g1[n], saved[n], rtol=0, atol=0)
        assert not torch.equal(g1[n], g2[n])
    ref = loop_reference(model, CE, x2, y2)
    for n in ref:
        torch.testing.assert_close(g2[n], ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", ["one view", "numpy", "one tensor"])
def test_any_view_of_the_results_keeps_them(keep):
    model = _model()
    x1, y1 = _batch(1)
    g1 = gs.per_example_gradients(model, CE, x1, y1)
    if keep == "one view":
        held = g1["2.weight"][3]
    elif keep == "numpy":
        held = g1["2.weight"].numpy()
    else:
        held = g1["0.bias"]
    saved = torch.as_tensor(held).clone()
    del g1
    for seed in (2, 3, 4):
        gs.per_example_gradients(model, CE, *_batch(seed))
    torch.testing.assert_close(torch.as_tensor(held), saved, rtol=0, atol=0)


def test_dropped_results_are_reused():
    model = _model()
    p1 = _ptr(gs.per_example_gradients(model, CE, *_batch(1)))
    p2 = _ptr(gs.per_example_gradients(model, CE, *_batch(2)))  # the first results were dropped
    assert p1 == p2


def test_workspace_opt_in_overwrites_and_is_exact():
    model = _model()
    ws = gs.Workspace()
    x1, y1 = _batch(1)
    x2, y2 = _batch(2)
    g1 = gs.per_example_gradients(model, CE, x1, y1, workspace=ws)
    ref1 = loop_reference(model, CE, x1, y1)
    for n in ref1:
        torch.testing.assert_close(g1[n], ref1[n], rtol=1e-5, atol=1e-6)
    g2 = gs.per_example_gradients(model, CE, x2, y2, workspace=ws)
    assert _ptr(g1) == _ptr(g2)
    for n in g1:  # the opt-in: g1 now holds the second batch's gradients
        torch.testing.assert_close(g1[n], g2[n], rtol=0, atol=0)
    assert ws.nbytes == 4 * 5 * sum(p.numel() for p in model.parameters())


def test_each_parameter_has_its_own_storage():
    """Saving or keeping one parameter's results never drags the whole B x P buffer along."""
    model = _model()
    g = gs.per_example_gradients(model, CE, *_batch(1))
    for n, t in g.items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), n


def test_chunks_write_their_rows_of_one_buffer():
    model = _model()
    x, y = _batch(3, b=7)
    whole = gs.per_example_gradients(model, CE, x, y)
    chunked = gs.per_example_gradients(model, CE, x, y, chunk_size=3)
    for n in whole:
        assert chunked[n].is_contiguous() and chunked[n].shape == whole[n].shape
        torch.testing.assert_close(chunked[n], whole[n], rtol=1e-6, atol=1e-7)


def test_acquire_reuses_only_free_buffers_and_release_drops_them():
    a = W.acquire(100, dtype=torch.float32, device="cpu")
    b = W.acquire(100, dtype=torch.float32, device="cpu")
    assert a.data_ptr() != b.data_ptr()
    pa = a.data_ptr()
    del a
    c = W.acquire(60, dtype=torch.float32, device="cpu")
    assert c.data_ptr() == pa and c.shape == (60,)
    assert W.pooled_bytes() == 2 * 100 * 4
    W.release()
    assert W.pooled_bytes() == 0


def test_pooling_off(monkeypatch):
    monkeypatch.setattr(W, "MAX_BUFFERS", 0)
    model = _model()
    g = gs.per_example_gradients(model, CE, *_batch(1))
    ref = loop_reference(model, CE, *_batch(1))
    for n in ref:
        torch.testing.assert_close(g[n], ref[n], rtol=1e-5, atol=1e-6)
    assert W.pooled_bytes() == 0


# ---------------------------------------------------------------- the grouped-convolution path

@pytest.mark.parametrize("layer, shape", [
    (lambda: nn.Conv2d(2, 3, 3, padding=1), (3, 2, 6, 5)),
    (lambda: nn.Conv2d(4, 6, (2, 3), stride=2, dilation=(1, 2), groups=2, bias=False), (2, 4, 7, 8)),
    (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", dilation=2), (3, 2, 6, 5)),
    (lambda: nn.Conv2d(2, 2, 3, padding=2, padding_mode="reflect"), (2, 2, 5, 6)),
    (lambda: nn.Conv1d(3, 2, 2, padding=1, padding_mode="circular"), (3, 3, 7)),
    (lambda: nn.Conv3d(2, 4, (1, 2, 3), padding=(0, 1, 1), stride=(1, 2, 1), groups=2), (2, 2, 3, 4, 5)),
])
def test_grouped_conv_path_equals_the_loop(monkeypatch, layer, shape):
    """Forced onto the batch-as-groups convolution path, every conv option still matches the
    float64 loop of single-example backward passes (and the unfold path)."""
    from gradsift.layers import conv
    from tests.layers.harness import check_per_example

    torch.manual_seed(0)
    m, x = layer(), torch.randn(*shape)
    cap = {}

    def spy(self, module, a, d, orig=conv.ConvRule.grouped):
        cap["grouped"] = True
        return True

    monkeypatch.setattr(conv.ConvRule, "grouped", spy)
    check_per_example(m, x, methods=("hooks",))
    assert cap.get("grouped")
    shared = nn.Sequential(m, nn.ReLU(), m) if m.in_channels == m.out_channels else None
    if shared is not None:  # one layer called twice: the calls add up
        check_per_example(shared, x, methods=("hooks",))


# ---------------------------------------------------------------- per-coordinate rows forms

def test_sort_rows_numpy_and_torch_paths_agree():
    from gradsift.aggregate.base import sort_rows_

    t = torch.randn(37, 13, dtype=torch.float64)
    ref = torch.sort(t, dim=1).values
    assert torch.equal(sort_rows_(t.clone()), ref)  # NumPy, in place
    half = t.to(torch.bfloat16)
    assert torch.equal(sort_rows_(half.clone()), torch.sort(half, dim=1).values)  # torch fallback


@pytest.mark.parametrize("b", [1, 2, 5, 8, 13])
def test_rows_forms_equal_numpy(b):
    """Each per-coordinate reducer's rows form ([n, B] -> [n]) and batch-first form equal numpy."""
    import numpy as np

    from gradsift import aggregate as A

    x = torch.randn(b, 4, 6, dtype=torch.float64)
    xs = np.sort(x.numpy(), axis=0)
    for agg, ref in [
        (A.winsorize(1), lambda: _np_winsor(xs, 1)),
        (A.winsorize(3), lambda: _np_winsor(xs, 3)),
        (A.winsorize(5), lambda: _np_winsor(xs, 5)),
        (A.trimmed_mean(0.25), lambda: xs[int(0.25 * b): b - int(0.25 * b)].mean(0) if int(0.25 * b) <= (b - 1) // 2
         else None),
        (A.coordinate_median(), lambda: np.median(x.numpy(), axis=0)),
    ]:
        expect = ref()
        if expect is None:
            continue
        rows = agg.per_coordinate.rows(x.reshape(b, -1).T.contiguous()).view(4, 6)
        np.testing.assert_allclose(rows.numpy(), expect, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(agg.per_coordinate(x).numpy(), expect, rtol=1e-12, atol=1e-12)


def _np_winsor(xs, c):
    b = xs.shape[0]
    c = min(c, (b - 1) // 2)
    w = xs.copy()
    w[:c] = xs[c]
    w[b - c:] = xs[b - c - 1]
    return w.mean(0)
