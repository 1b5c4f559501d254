"""Aggregators equal plain numpy references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gradsift as gs
from gradsift import aggregate as A

from .aggregate_harness import np_clip, np_m3, np_trimmed, np_winsorize

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
batches = st.integers(1, 13).flatmap(
    lambda b: arrays(np.float32, st.tuples(st.just(b), st.integers(1, 4), st.integers(1, 3)), elements=finite)
)


def run(agg, x: np.ndarray):
    grads = {"w": torch.from_numpy(np.asarray(x, dtype=np.float64))}
    update, _ = agg.update(grads, agg.init({"w": grads["w"][0]}))
    return update["w"].numpy()


@settings(max_examples=60, deadline=None)
@given(batches)
def test_mean(x):
    np.testing.assert_allclose(run(A.mean(), x), x.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches, st.integers(0, 6))
def test_winsorize(x, c):
    np.testing.assert_allclose(run(A.winsorize(c), x), np_winsorize(x.astype(np.float64), c), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_m3(x):
    np.testing.assert_allclose(run(A.m3(), x), np_m3(x.astype(np.float64)), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches, st.floats(0, 0.49))
def test_trimmed_mean(x, f):
    np.testing.assert_allclose(run(A.trimmed_mean(f), x), np_trimmed(x.astype(np.float64), f), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches)
def test_coordinate_median(x):
    np.testing.assert_allclose(run(A.coordinate_median(), x), np.median(x.astype(np.float64), 0), rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches, st.floats(0.01, 100))
def test_clip_then_mean(x, c):
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(run(A.chain(A.clip(c), A.mean()), x), np_clip({"w": x64}, c)["w"].mean(0), rtol=1e-7, atol=1e-9)


def test_clip_bounds_every_norm_over_layers():
    grads = {"a": torch.randn(10, 3, 4) * 10, "b": torch.randn(10, 5)}
    clipped, _ = A.clip(1.5).update(grads, ())
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in clipped.values()))
    assert (norms <= 1.5 + 1e-5).all()
    small = {"a": torch.full((2, 3, 4), 1e-3), "b": torch.zeros(2, 5)}
    same, _ = A.clip(1.5).update(small, ())
    torch.testing.assert_close(same["a"], small["a"], rtol=1e-5, atol=0)


def test_edge_cases_documented():
    # B = 1: every reducer returns the single example
    one = np.array([[3.0, -2.0]])
    for agg in (A.mean(), A.winsorize(3), A.m3(), A.trimmed_mean(0.4), A.coordinate_median()):
        np.testing.assert_allclose(run(agg, one), one[0])
    # B = 2 < 2c + 1: winsorize falls back to the median (= mean of the two)
    np.testing.assert_allclose(run(A.winsorize(1), np.array([[1.0], [5.0]])), [3.0])
    # B = 4 < 2*2+1 -> c lowered to 1: clamp to 2nd smallest / 2nd largest
    y = np.array([[0.0], [1.0], [2.0], [100.0]])
    np.testing.assert_allclose(run(A.winsorize(2), y), [(1 + 1 + 2 + 2) / 4])
    # c = 1 clips one value at each end to its neighbour
    np.testing.assert_allclose(run(A.winsorize(1), np.array([[-9.0], [1.0], [2.0], [3.0], [50.0]])), [(1 + 1 + 2 + 3 + 3) / 5])
    # m3 with B = 7: groups of 3, 2, 2 (numpy.array_split): means 1, 10, -45 -> median 1
    z = np.array([[0.0], [0.0], [3.0], [10.0], [10.0], [-50.0], [-40.0]])
    np.testing.assert_allclose(run(A.m3(), z), [1.0])


def test_rm3_median_of_three_steps():
    agg = A.rm3()
    assert agg.input == "batch" and not agg.needs_per_example
    state = agg.init({})
    seq = [torch.tensor([1.0, 10.0]), torch.tensor([5.0, -3.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 7.0])]
    outs = []
    for g in seq:
        u, state = agg.update({"w": g}, state)
        outs.append(u["w"])
    torch.testing.assert_close(outs[0], seq[0])
    torch.testing.assert_close(outs[1], seq[1])
    torch.testing.assert_close(outs[2], torch.tensor(np.median(np.stack([s.numpy() for s in seq[:3]]), 0)))
    torch.testing.assert_close(outs[3], torch.tensor(np.median(np.stack([s.numpy() for s in seq[1:4]]), 0)))


def test_nonfinite_raises_or_drops():
    g = torch.randn(5, 3)
    g[2, 1] = float("nan")
    g[4, 0] = float("inf")
    with pytest.raises(gs.NonFiniteGradientError, match=r"2 example\(s\).*2, 4.*drop_nonfinite"):
        A.winsorize(1).update({"w": g}, ())
    agg = A.chain(A.drop_nonfinite(), A.mean())
    u, state = agg.update({"w": g}, agg.init({}))
    torch.testing.assert_close(u["w"], g[[0, 1, 3]].mean(0))
    assert state[0] == 2


def test_empty_batch_gives_zero_update():
    u, _ = A.mean().update({"w": torch.zeros(0, 3)}, ())
    assert u["w"].shape == (3,) and not u["w"].any()


def test_chain_checks_kinds_and_write_grads():
    with pytest.raises(ValueError, match="gives batch"):
        A.chain(A.mean(), A.clip(1.0))
    model = torch.nn.Linear(3, 2)
    A.write_grads(model, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(model.weight.grad, torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        A.write_grads(model, {"weight": torch.ones(3, 2)})


def test_write_grads_hands_over_fresh_tensors_and_copies_when_it_must():
    model = torch.nn.Linear(3, 2)
    u = {"weight": torch.ones(2, 3), "bias": torch.zeros(2, dtype=torch.float64)}
    A.write_grads(model, u)
    assert model.weight.grad is not None and model.weight.grad.data_ptr() == u["weight"].data_ptr()  # no copy
    assert model.bias.grad.dtype == torch.float32  # another dtype: converted, a copy
    model.zero_grad(set_to_none=True)
    A.write_grads(model, u, copy=True)
    assert model.weight.grad.data_ptr() != u["weight"].data_ptr() and torch.equal(model.weight.grad, u["weight"])
    g = model.weight.grad
    A.write_grads(model, {"weight": torch.full((2, 3), 2.0)})  # an existing .grad is overwritten in place
    assert model.weight.grad is g and torch.equal(g, torch.full((2, 3), 2.0))
    model.zero_grad(set_to_none=True)
    A.write_grads(model, {"weight": model.weight})  # the parameter itself is never its own gradient
    assert model.weight.grad.data_ptr() != model.weight.data_ptr()


def test_step_update_never_shares_memory_with_the_state():
    """An aggregator that returns its state as the update: writing it into .grad (no copy)
    and changing .grad in place must leave the state alone."""

    def update(grads, state):
        kept = {n: g.clone() for n, g in grads.items()}
        return kept, kept

    echo = A.Aggregator("echo", lambda params: None, update, "batch", "batch")
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    r = A.step_update(model, torch.nn.CrossEntropyLoss(reduction="none"), x, y, echo)
    A.write_grads(model, r.update)
    before = r.state["weight"].clone()
    model.weight.grad.mul_(0)
    assert torch.equal(r.state["weight"], before)


def test_owned():
    from gradsift.aggregate.base import owned

    a, b = torch.randn(3), torch.randn(2, 2)
    assert owned({"a": a, "b": b}, None)
    assert not owned({"a": a, "b": a.view(3)}, None)  # one gradient tensor for two parameters
    assert not owned({"a": a, "b": b}, ({"kept": b[0]},))  # a stage's state holds b's memory
    assert not owned({"a": torch.randn(3, requires_grad=True)}, None)


def test_dp_noise_in_place_equals_out_of_place_and_spares_state():
    """The layer-wise DP step adds its noise into the update's own buffers: the same bits as
    the out-of-place form, and never into a tensor a preceding stage keeps as its state."""
    noise = A.gaussian_noise(1.0, 1.0, 4.0, seed=3)
    grads = {"w": torch.randn(5, 3), "b": torch.randn(5)}
    expected, step = noise.update(grads, 7)
    inplace = {n: g.clone() for n, g in grads.items()}
    assert noise.update_in_place(inplace, 7) == step == 8
    for n in grads:
        assert torch.equal(inplace[n], expected[n])

    def keep(grads, state):  # returns its state as the update
        kept = {n: g.clone() for n, g in grads.items()}
        return kept, kept

    keeper = A.Aggregator("keep", lambda params: None, keep, "batch", "batch")
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    for agg in (A.chain(A.clip(1.0), A.normalized_sum(4.0), noise),
                A.chain(A.clip(1.0), A.normalized_sum(4.0), keeper, noise)):
        r = A.step_update(model, loss, x, y, agg, agg.init(dict(model.named_parameters())))
        assert r.path == "layerwise"
        ref = A.step_update(model, loss, x, y, agg, agg.init(dict(model.named_parameters())), layerwise=False)
        for n in r.update:
            torch.testing.assert_close(r.update[n], ref.update[n])
        if len(agg.parts) == 4:  # the keeper's state is the clean clipped sum, not noised
            clean = A.step_update(model, loss, x, y, A.chain(A.clip(1.0), A.normalized_sum(4.0))).update
            for n in clean:
                torch.testing.assert_close(r.state[2][n], clean[n])


@pytest.mark.parametrize("bad", [lambda: A.winsorize(-1), lambda: A.trimmed_mean(0.5), lambda: A.clip(0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_specs():
    from gradsift.aggregate import aggregator_from_spec

    assert aggregator_from_spec("winsorize:c=2").name == "winsorize(c=2)"
    assert aggregator_from_spec("clip:max_norm=1.5+mean").name == "clip(max_norm=1.5) > mean"
    with pytest.raises(gs.SpecError, match="unknown aggregator 'nope'"):
        aggregator_from_spec("nope")
    with pytest.raises(gs.SpecError, match="bad options"):
        aggregator_from_spec("winsorize:q=2")
    with pytest.raises(gs.SpecError, match="key=value"):
        aggregator_from_spec("winsorize:2")
