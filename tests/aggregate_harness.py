"""One harness for every aggregator: numpy references and three checks.

* :func:`check_local`: the local form equals a float64 numpy reference;
* :func:`check_layerwise`: :func:`gradsift.aggregate.step_update` layer by layer equals
  the materialized path (per-example gradients of the whole model, then ``update``);
* :func:`check_sharded`: thread-ranks with :class:`~gradsift.aggregate.GlobalAggregation`
  equal one process on the whole batch.

A new aggregator's test adds one entry to :data:`CASES` (spec + numpy reference) or
calls the checks itself.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradsift import aggregate as A
from gradsift.aggregate import GlobalAggregation, aggregator_from_spec, step_update
from gradsift.distributed import shard_bounds

from ._dist import run_threads

NpGrads = dict[str, np.ndarray]


# ---------------------------------------------------------------- numpy references

def np_winsorize(x, c):
    b = x.shape[0]
    c = min(c, (b - 1) // 2)
    s = np.sort(x, axis=0)
    lo, hi = s[c], s[b - 1 - c]
    return np.clip(x, lo, hi).mean(0)


def np_m3(x):
    b = x.shape[0]
    if b < 3:
        return x.mean(0)
    groups = np.array_split(x, 3, axis=0)
    return np.median(np.stack([g.mean(0) for g in groups]), axis=0)


def np_trimmed(x, f):
    b = x.shape[0]
    k = min(int(np.floor(f * b)), (b - 1) // 2)
    s = np.sort(x, axis=0)
    return s[k : b - k].mean(0)


def np_clip(grads: NpGrads, c: float) -> NpGrads:
    b = next(iter(grads.values())).shape[0]
    norms = np.sqrt(sum((g.reshape(b, -1) ** 2).sum(1) for g in grads.values()))
    f = np.minimum(1.0, c / (norms + 1e-6))
    return {n: g * f.reshape(-1, *([1] * (g.ndim - 1))) for n, g in grads.items()}


def np_gaf(grads: NpGrads, micro_batches, threshold) -> NpGrads:
    """Gradient Agreement Filtering, written out: micro-batch means, running sum, cosine
    distance against the threshold."""
    b = next(iter(grads.values())).shape[0]
    k = b if micro_batches is None else min(micro_batches, b)
    flat = np.concatenate([g.reshape(b, -1) for g in grads.values()], axis=1)
    means = [part.mean(0) for part in np.array_split(flat, k, axis=0)]
    s, kept = means[0].copy(), [0]
    for j in range(1, k):
        denom = np.linalg.norm(s) * np.linalg.norm(means[j])
        cos = float(s @ means[j] / denom) if denom > 0 else 0.0
        if 1.0 - cos <= threshold:
            s += means[j]
            kept.append(j)
    u = s / len(kept)
    out, start = {}, 0
    for n, g in grads.items():
        size = int(np.prod(g.shape[1:]))
        out[n] = u[start : start + size].reshape(g.shape[1:])
        start += size
    return out


def per_coordinate(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[NpGrads], NpGrads]:
    return lambda grads: {n: fn(g) for n, g in grads.items()}


#: spec -> numpy reference on float64 per-example gradients (name -> [B, *shape]).
CASES: dict[str, Callable[[NpGrads], NpGrads]] = {
    "mean": per_coordinate(lambda x: x.mean(0)),
    "winsorize:c=1": per_coordinate(lambda x: np_winsorize(x, 1)),
    "winsorize:c=3": per_coordinate(lambda x: np_winsorize(x, 3)),
    "m3": per_coordinate(np_m3),
    "trimmed_mean:fraction=0.2": per_coordinate(lambda x: np_trimmed(x, 0.2)),
    "coordinate_median": per_coordinate(lambda x: np.median(x, 0)),
    "normalized_sum:expected_batch_size=7.5": per_coordinate(lambda x: x.sum(0) / 7.5),
    "clip:max_norm=0.5+mean": lambda g: {n: v.mean(0) for n, v in np_clip(g, 0.5).items()},
    "clip:max_norm=0.5+winsorize:c=2": lambda g: {n: np_winsorize(v, 2) for n, v in np_clip(g, 0.5).items()},
    "drop_nonfinite+m3": per_coordinate(np_m3),
    "require_all_parameters+clip:max_norm=0.5+normalized_sum:expected_batch_size=4":
        lambda g: {n: v.sum(0) / 4 for n, v in np_clip(g, 0.5).items()},
    "gaf:micro_batches=4,threshold=0.97": lambda g: np_gaf(g, 4, 0.97),
    "gaf:micro_batches=None,threshold=1.0": lambda g: np_gaf(g, None, 1.0),
    "gaf:micro_batches=3,threshold=2.0": lambda g: np_gaf(g, 3, 2.0),
}


# ---------------------------------------------------------------- checks

def check_local(spec: str, grads: NpGrads, reference=None, rtol=1e-7, atol=1e-9) -> None:
    """The local form on float64 ``grads`` equals the numpy reference."""
    agg = aggregator_from_spec(spec)
    reference = reference or CASES[spec]
    t = {n: torch.from_numpy(np.asarray(g, dtype=np.float64)) for n, g in grads.items()}
    got, _ = agg.update(t, agg.init({n: v[0] for n, v in t.items()}))
    want = reference({n: np.asarray(g, dtype=np.float64) for n, g in grads.items()})
    for n in want:
        np.testing.assert_allclose(got[n].numpy(), want[n], rtol=rtol, atol=atol, err_msg=f"{spec}: {n}")


def small_model(seed: int = 0, b: int = 20):
    """Conv2d + GroupNorm + Linear + LayerNorm (every hook family) and a batch."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3),
    )
    return model, torch.randn(b, 1, 8, 8), torch.randint(0, 3, (b,))


CE = nn.CrossEntropyLoss(reduction="none")


def check_layerwise(agg, model=None, x=None, y=None, steps: int = 2, atol=1e-6, rtol=1e-5,
                    expect_layerwise: bool = True, **side) -> None:
    """Layer by layer == materialized, over ``steps`` steps (stateful tails agree too)."""
    if model is None:
        model, x, y = small_model()
    agg = aggregator_from_spec(agg) if isinstance(agg, str) else agg
    s_lw = s_mat = None
    for step in range(steps):
        xs, ys = x[step:], y[step:]
        extra = {k: v[step:] for k, v in side.items()}
        lw = step_update(model, CE, xs, ys, agg, s_lw, **extra)
        mat = step_update(model, CE, xs, ys, agg, s_mat, layerwise=False, **extra)
        assert mat.path == "materialized"
        assert (lw.path in ("layerwise", "plain")) == expect_layerwise, (agg.name, lw.path)
        assert set(lw.update) == set(mat.update)
        for n in mat.update:
            torch.testing.assert_close(lw.update[n], mat.update[n], atol=atol, rtol=rtol,
                                       msg=f"{agg.name} step {step}: {n}")
        torch.testing.assert_close(lw.losses, mat.losses)
        s_lw, s_mat = lw.state, mat.state


def shards_of(grads, world_size):
    b = next(iter(grads.values())).shape[0]
    return [{n: g[lo:hi] for n, g in grads.items()} for lo, hi in shard_bounds(b, world_size)]


def check_sharded(agg, grads, world_size: int, atol=1e-5, rtol=1e-5, compare_state=True) -> None:
    """Thread-ranks, each with its contiguous shard, give the one-process update."""
    agg = aggregator_from_spec(agg) if isinstance(agg, str) else agg
    want, want_state = agg.update(grads, agg.init({}))
    shards = shards_of(grads, world_size)

    def rank(comm):
        return GlobalAggregation(agg, comm).update(shards[comm.rank], agg.init({}))

    for r, got in enumerate(run_threads(world_size, rank)):
        assert not isinstance(got, BaseException), got
        out, state = got
        assert out.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(out[n], want[n], atol=atol, rtol=rtol,
                                       msg=f"{agg.name} W={world_size} rank {r}: {n}")
        if compare_state:
            assert state == want_state


def check_step_sharded(agg, world_size: int = 2, b: int = 12, expect: str = "layerwise") -> None:
    """step_update with ``comm`` on thread-ranks == step_update on the whole batch."""
    model, x, y = small_model(b=b)
    agg = aggregator_from_spec(agg) if isinstance(agg, str) else agg
    want = step_update(model, CE, x, y, agg, None, layerwise=False)
    bounds = shard_bounds(b, world_size)

    replicas = [copy.deepcopy(model) for _ in range(world_size)]  # thread-ranks: own hooks

    def rank(comm):
        lo, hi = bounds[comm.rank]
        return step_update(replicas[comm.rank], CE, x[lo:hi], y[lo:hi], agg, None, comm=comm)

    for got in run_threads(world_size, rank):
        assert not isinstance(got, BaseException), got
        assert got.path == expect or (expect == "layerwise" and got.path == "plain"), got.path
        for n in want.update:
            torch.testing.assert_close(got.update[n], want.update[n], atol=1e-5, rtol=1e-4)


def random_grads(b: int, seed: int, ties: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"w": torch.randn(b, 3, 4, generator=g, dtype=torch.float64),
           "b": torch.randn(b, 5, generator=g, dtype=torch.float64) * 3}
    if ties:
        out = {n: (v * 2).round() / 2 for n, v in out.items()}
    return out


__all__ = ["CASES", "check_local", "check_layerwise", "check_sharded", "check_step_sharded",
           "small_model", "random_grads", "CE", "A"]
