"""The winsorizing kernels (``gradsift.aggregate.extremes``) against a float64 numpy
reference, against the torch path, and on the layer-wise step."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradsift import aggregate as A
from gradsift.aggregate import extremes, step_update
from gradsift.aggregate.winsorize import winsorized_mean

from .aggregate_harness import np_trimmed, np_winsorize

pytestmark = pytest.mark.skipif(not extremes.available(), reason="numba is not installed")

DTYPES = {"float32": (torch.float32, 1e-5, 1e-4), "float64": (torch.float64, 1e-10, 1e-10)}
#: c on both sides of every layout boundary (narrow blocks up to NARROW_LEVELS rows per
#: side, tiles above; winsorizing keeps c + 1 rows, trimming c) and the largest.
CS = sorted({1, extremes.NARROW_LEVELS - 1, extremes.NARROW_LEVELS, extremes.NARROW_LEVELS + 1, extremes.MAX_C})


def capped(b: int, c: int) -> int:
    return min(c, (b - 1) // 2)


def np_reduce(x: np.ndarray, c: int, trim: bool) -> np.ndarray:
    """float64 reference: winsorized mean, or the mean without c values at each end."""
    return np_trimmed(x, (c + 1e-9) / x.shape[0]) if trim else np_winsorize(x, c)


def kernel_batch(x, c, trim):
    return (extremes.trimmed_batch if trim else extremes.winsorized_batch)(x, c)


def kernel_outer(d, a, c, trim):
    return (extremes.trimmed_outer if trim else extremes.winsorized_outer)(d, a, c)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(3, 30), n=st.integers(1, 1300), c=st.sampled_from(CS),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16), ties=st.booleans(),
       trim=st.booleans())
def test_batch_kernel_equals_reference(b, n, c, dtype, seed, ties, trim):
    torch_dtype, rtol, atol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n)) * 10
    if ties:  # few distinct values: every tie case of the network
        x = np.round(x / 10)
    xt = torch.from_numpy(x).to(torch_dtype)
    got = kernel_batch(xt, capped(b, c), trim)
    assert got is not None
    want = np_reduce(xt.double().numpy(), capped(b, c), trim)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None)
@given(b=st.integers(3, 30), o=st.integers(1, 9), k=st.integers(1, 700), c=st.sampled_from(CS),
       dtype=st.sampled_from(sorted(DTYPES)), seed=st.integers(0, 2**16), trim=st.booleans())
def test_outer_kernel_equals_reference(b, o, k, c, dtype, seed, trim):
    torch_dtype, rtol, atol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    d = torch.from_numpy(rng.standard_normal((b, o))).to(torch_dtype)
    a = torch.from_numpy(rng.standard_normal((b, k))).to(torch_dtype)
    got = kernel_outer(d, a, capped(b, c), trim)
    assert got is not None and got.shape == (o, k)
    products = d.double().numpy()[:, :, None] * a.double().numpy()[:, None, :]
    np.testing.assert_allclose(got.double().numpy(), np_reduce(products, capped(b, c), trim), rtol=rtol, atol=atol)


def test_threads_give_the_same_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 40_000, generator=g)
    d, a = torch.randn(9, 64, generator=g), torch.randn(9, 700, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = extremes.winsorized_batch(x, 2), extremes.winsorized_outer(d, a, 2)
        torch.set_num_threads(2)
        two = extremes.winsorized_batch(x, 2), extremes.winsorized_outer(d, a, 2)
    finally:
        torch.set_num_threads(before)
    for p, q in zip(one, two):
        assert torch.equal(p, q)


def test_not_applicable_returns_none(monkeypatch):
    x = torch.randn(7, 5)
    assert extremes.winsorized_batch(x.half(), 1) is None
    assert extremes.winsorized_batch(x.to(torch.int64), 1) is None
    assert extremes.winsorized_batch(x.requires_grad_(), 1) is None
    assert extremes.winsorized_batch(torch.randn(7, 5), extremes.MAX_C + 1) is None
    assert extremes.winsorized_outer(torch.randn(7, 2), torch.randn(7, 3).double(), 1) is None
    monkeypatch.setattr(extremes, "ENABLED", False)
    assert extremes.winsorized_batch(torch.randn(7, 5), 1) is None


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_values_take_the_torch_path(monkeypatch, bad):
    x = torch.randn(9, 600, dtype=torch.float64)
    x[4, 3] = bad
    assert extremes.winsorized_batch(x, 1) is None
    fast = winsorized_mean(x, 1)
    monkeypatch.setattr(extremes, "ENABLED", False)
    torch.testing.assert_close(fast, winsorized_mean(x, 1), equal_nan=True)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 13), n=st.integers(1, 40), c=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_torch_path_still_equals_reference(b, n, c, seed):
    x = np.random.default_rng(seed).standard_normal((b, n))
    extremes.ENABLED = False
    try:
        got = winsorized_mean(torch.from_numpy(x), c)
    finally:
        extremes.ENABLED = True
    np.testing.assert_allclose(got.numpy(), np_winsorize(x, c), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spec, kernel", [("winsorize:c=1", "winsorized_outer"), ("winsorize:c=3", "winsorized_outer"),
                                          ("trimmed_mean:fraction=0.3", "trimmed_outer")])
@pytest.mark.parametrize("b", [10, 11])
def test_layerwise_step_uses_the_outer_kernel_and_equals_torch_path(monkeypatch, spec, kernel, b):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).double()
    x, y = torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 5, (b,))
    loss = nn.CrossEntropyLoss(reduction="none")
    calls = []
    original = getattr(extremes, kernel)
    monkeypatch.setattr(extremes, kernel, lambda *a: calls.append(1) or original(*a))
    agg = A.aggregator_from_spec(spec)
    fast = step_update(model, loss, x, y, agg, None)
    assert fast.path == "layerwise" and len(calls) == 2  # both Linear weights
    monkeypatch.setattr(extremes, "ENABLED", False)
    slow = step_update(model, loss, x, y, agg, None)
    materialized = step_update(model, loss, x, y, agg, None, layerwise=False)
    for n in slow.update:
        torch.testing.assert_close(fast.update[n], slow.update[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fast.update[n], materialized.update[n], rtol=1e-10, atol=1e-12)


def test_unwritable_kernel_dir_compiles_in_memory(tmp_path):
    import subprocess
    import sys

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code = ("import torch; from gradsift.aggregate import extremes as E; x = torch.randn(9, 700, dtype=torch.float64); "
            "r = E.winsorized_batch(x, 2); s = x.sort(0).values; "
            "w = (s[2:-2].sum(0) + 2 * (s[2] + s[-3])) / 9; print(float((r - w).abs().max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "GRADSIFT_CACHE_DIR": str(blocker)})
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-12
    assert not (blocker / "kernels").exists()


def test_a_kernel_that_fails_on_first_use_turns_the_kernels_off(monkeypatch):
    """A compile failure (Numba/LLVM) warns once and falls back; results stay right."""
    monkeypatch.setattr(extremes, "_ran", set())
    monkeypatch.setattr(extremes, "_failed", "")  # restored to "" (kernels on) after the test
    monkeypatch.setattr(extremes, "thread_map", lambda fn, jobs: (_ for _ in ()).throw(RuntimeError("no LLVM")))
    x = torch.randn(9, 50, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="no LLVM"):
        got = winsorized_mean(x, 2)
    assert not extremes.available()
    np.testing.assert_allclose(got.numpy(), np_winsorize(x.numpy(), 2), rtol=1e-12)
    assert winsorized_mean(x, 2) is not None  # no second warning: the kernels stay off


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("c", [1, extremes.NARROW_LEVELS + 1])
def test_outliers_do_not_cost_the_small_values_their_precision(trim, c):
    """float32 values of ~1e-3 with outliers of ~1e6: the result is as exact as the small
    values allow (a sum less the extremes would cancel the outliers and keep only their
    rounding error, about 0.06 here)."""
    g = torch.Generator().manual_seed(0)
    b, n = 64, 300
    x = torch.rand(b, n, generator=g) * 1e-3
    x[:c, :] = 1e6 * (1 + torch.rand(c, n, generator=g))
    x[-c:, :] = -1e6 * (1 + torch.rand(c, n, generator=g))
    want = np_reduce(x.double().numpy(), c, trim)
    got = kernel_batch(x, c, trim)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=0)
    d = torch.ones(b, 1)
    got = kernel_outer(d, x, c, trim)[0]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=0)


def test_torch_path_keeps_the_precision_next_to_outliers(monkeypatch):
    monkeypatch.setattr(extremes, "ENABLED", False)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(40, 200, generator=g) * 1e-3
    x[0], x[-1] = 1e6, -1e6
    np.testing.assert_allclose(winsorized_mean(x, 1).double().numpy(), np_winsorize(x.double().numpy(), 1), rtol=1e-5, atol=0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"winsorized_batch: x must be 2-D \(\[B, \.\.\.\]\), got shape \(5,\)"):
        extremes.winsorized_batch(torch.randn(5), 1)
    with pytest.raises(ValueError, match=r"trimmed_outer: d \(5, 2\) and a \(4, 3\) need the same batch size"):
        extremes.trimmed_outer(torch.randn(5, 2), torch.randn(4, 3), 1)
