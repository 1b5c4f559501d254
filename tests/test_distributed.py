"""Distributed aggregation and training: thread-ranks for the reductions (many cases,
fast), real gloo ranks on loopback for training, scoring and failure."""

from __future__ import annotations

import pytest
import torch

import gradsift as gs
import gradsift.aggregate as A
from gradsift.aggregate import Aggregator
from gradsift.distributed import GlobalAggregation, shard_bounds
from gradsift.errors import NonFiniteGradientError
from gradsift.aggregate import aggregator_from_spec

from ._dist import run_threads


def _center() -> Aggregator:
    """A per-example stage that is not example-wise (subtracts the batch mean)."""

    def update(grads, state):
        return {n: g - g.mean(0, keepdim=True) for n, g in grads.items()}, state + 1

    return Aggregator("center", lambda p: 0, update, "per_example", "per_example")


SPECS = ["mean", "winsorize:c=0", "winsorize:c=1", "winsorize:c=3", "winsorize:c=50", "m3",
         "trimmed_mean:fraction=0.1", "trimmed_mean:fraction=0.34", "coordinate_median",
         "clip:max_norm=0.5+mean", "clip:max_norm=0.5,per_layer=True+winsorize:c=2",
         "winsorize:c=1+rm3", "drop_nonfinite+m3"]


def _grads(b: int, seed: int, ties: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"w": torch.randn(b, 3, 4, generator=g), "b": torch.randn(b, 5, generator=g) * 3}
    if ties:  # few distinct values: order statistics with many ties
        out = {n: (v * 2).round() / 2 for n, v in out.items()}
    return out


def _shards(grads, world_size):
    b = next(iter(grads.values())).shape[0]
    return [{n: g[lo:hi] for n, g in grads.items()} for lo, hi in shard_bounds(b, world_size)]


def _global(agg, grads, world_size, mode="exact", steps=1):
    shards = _shards(grads, world_size)

    def rank(comm):
        ga = GlobalAggregation(agg, comm, mode)
        state = agg.init({})
        for _ in range(steps):
            out, state = ga.update(shards[comm.rank], state)
        return out, state

    return run_threads(world_size, rank)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_exact_global_aggregation_equals_one_process(spec, world_size):
    agg = aggregator_from_spec(spec)
    for b in (1, 2, 3, 5, 7, 12, 31):
        for ties in (False, True):
            grads = _grads(b, seed=b, ties=ties)
            want, want_state = agg.update(grads, agg.init({}))
            for got, state in _global(agg, grads, world_size):
                assert got.keys() == want.keys()
                for n in want:
                    torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5,
                                               msg=f"{spec} B={b} W={world_size} ties={ties} {n}")
                if not spec.endswith("rm3"):
                    assert state == want_state


def test_rm3_state_and_fallback_stage_match_one_process():
    # rm3 keeps two previous updates; a non-example-wise stage forces a full gather
    for agg in (aggregator_from_spec("winsorize:c=1+rm3"), A.chain(_center(), A.m3())):
        steps = [_grads(9, seed=s, ties=False) for s in range(4)]
        state = agg.init({})
        for g in steps:
            want, state = agg.update(g, state)
        shards = [_shards(g, 2) for g in steps]

        def rank(comm, agg=agg, shards=shards):
            ga, s = GlobalAggregation(agg, comm), agg.init({})
            for sh in shards:
                out, s = ga.update(sh[comm.rank], s)
            return out

        for got in run_threads(2, rank):
            for n in want:
                torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5)


def test_nonfinite_on_one_rank_fails_every_rank_and_drop_counts_globally():
    grads = _grads(8, seed=0, ties=False)
    grads["w"][6] = float("nan")  # on rank 1 of 2
    results = _global(aggregator_from_spec("winsorize:c=1"), grads, 2)
    assert all(isinstance(r, NonFiniteGradientError) for r in results)
    assert "another rank" in str(results[0]) and "positions 2" in str(results[1])
    agg = aggregator_from_spec("drop_nonfinite+m3")
    want, want_state = agg.update(grads, agg.init({}))
    for got, state in _global(agg, grads, 2):
        assert state == want_state == (1, ())
        torch.testing.assert_close(got["w"], want["w"], atol=1e-5, rtol=1e-5)


def test_local_mode_is_the_weighted_mean_of_shard_results():
    grads = _grads(7, seed=1, ties=False)
    agg = A.winsorize(1)
    shards = _shards(grads, 2)
    parts = [agg.update(s, ())[0] for s in shards]
    want = {n: (parts[0][n] * 4 + parts[1][n] * 3) / 7 for n in grads}
    for got, _ in _global(agg, grads, 2, mode="local"):
        for n in want:
            torch.testing.assert_close(got[n], want[n])
    exact = agg.update(grads, ())[0]
    assert not torch.allclose(want["w"], exact["w"])  # local mode is a different estimator


def test_shard_bounds_concatenate_in_order():
    for n in range(0, 12):
        for w in (1, 2, 3, 5):
            b = shard_bounds(n, w)
            assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
            sizes = [hi - lo for lo, hi in b]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# ---------------------------------------------------------------- real gloo ranks on loopback

def test_two_gloo_ranks_train_like_one_process(tmp_path):
    """2 ranks (gloo, loopback) = 1 process on the same global batches, for mean, clip and
    every exact robust aggregator; the per-example tables written by rank 0 hold every
    example of every step exactly once and equal the single-process tables."""
    import pandas as pd

    from . import dist_worker as w
    from ._dist import launch

    ranks = launch(["tests/dist_worker.py", "compare", str(tmp_path)], world_size=2, timeout=240)
    for r in ranks:
        assert r.returncode == 0, r.stderr[-3000:]
    for spec in w.AGGREGATORS:
        one = w.fit(spec, run_dir=tmp_path / "one" / spec)
        got = torch.load(tmp_path / spec / "params.pt")
        for n, p in one.model.state_dict().items():
            torch.testing.assert_close(got[n], p, atol=2e-5, rtol=1e-4, msg=f"{spec}: {n}")
        two_dir, one_dir = tmp_path / spec, tmp_path / "one" / spec
        losses2, losses1 = pd.read_parquet(two_dir / "losses.parquet"), pd.read_parquet(one_dir / "losses.parquet")
        assert len(losses2) == w.N_TRAIN * w.EPOCHS and losses2.example_id.is_unique
        pd.testing.assert_frame_equal(losses2, losses1, atol=1e-5, rtol=1e-4)
        m2, m1 = pd.read_parquet(two_dir / "metrics.parquet"), pd.read_parquet(one_dir / "metrics.parquet")
        pd.testing.assert_frame_equal(m2, m1, atol=1e-5, rtol=1e-4)
        pd.testing.assert_frame_equal(pd.read_parquet(two_dir / "coherence.parquet"),
                                      pd.read_parquet(one_dir / "coherence.parquet"), atol=1e-4, rtol=1e-4)
        scores2 = pd.read_parquet(two_dir / "scores.parquet")  # dynamics + TracIn (sharded over ranks)
        assert len(scores2) == w.N_TRAIN and scores2.example_id.is_unique and "self_influence" in scores2
        pd.testing.assert_frame_equal(scores2, pd.read_parquet(one_dir / "scores.parquet"), atol=1e-5, rtol=1e-4)
        dyn2 = pd.read_parquet(two_dir / "dynamics")
        pd.testing.assert_frame_equal(dyn2, pd.read_parquet(one_dir / "dynamics"), atol=1e-5, rtol=1e-4)
        manifest = (two_dir / "manifest.json").read_text()
        assert '"world_size": 2' in manifest and '"status": "finished"' in manifest


def test_a_dead_rank_fails_the_job_clearly_and_the_run_resumes(tmp_path):
    """Rank 1 dies in epoch 2: rank 0 stops with a DistributedError naming the collective and
    the way to resume (not a hang: collectives time out after 30 s); the run directory holds
    epoch 1 and resumes (here on one process) to the uninterrupted result."""
    import json

    import pandas as pd

    from . import dist_worker as w
    from ._dist import launch

    run = tmp_path / "run"
    rank0, rank1 = launch(["tests/dist_worker.py", "die", str(run)], world_size=2, timeout=120)
    assert rank1.returncode == 3
    assert rank0.returncode != 0 and "killed after" not in rank0.stderr
    assert "DistributedError" in rank0.stderr and "rank 0 of 2" in rank0.stderr, rank0.stderr[-3000:]
    assert "epoch 2" in rank0.stderr and "--resume" in rank0.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert list(pd.read_parquet(run / "metrics.parquet").epoch) == [1]

    tr, te = w.data()
    common = dict(aggregator="m3", optimizer="sgd:lr=0.3", epochs=3, batch_size=w.BATCH, seed=1, progress=False)
    resumed = gs.fit(w.model(), tr, te, run_dir=run, resume=True, **common)
    full = gs.fit(w.model(), tr, te, **common)
    pd.testing.assert_frame_equal(resumed.history, full.history, atol=1e-5, rtol=1e-4)
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_gradsift_train_under_torchrun_matches_one_process(tmp_path):
    """The CLI started by torchrun (--standalone: rendezvous on a free loopback port)."""
    import pandas as pd
    from typer.testing import CliRunner

    from gradsift.cli import app

    from ._dist import torchrun

    args = ["train", "--epochs", "1", "--model", "mlp:width=16", "--aggregator", "winsorize:c=2",
            "--batch-size", "200", "--no-coherence", "--dist-timeout", "60", "-q"]
    r = torchrun(["-m", "gradsift", *args, "--run-dir", str(tmp_path / "two")], nproc=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1  # only rank 0 reports
    one = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / "metrics.parquet"),
                                  pd.read_parquet(tmp_path / "one" / "metrics.parquet"), atol=1e-5, rtol=1e-4)


def test_scores_with_two_ranks_equal_one_rank(tmp_path):
    """`gradsift scores` under torchrun: the memorization models are spread over the ranks,
    the training-dynamics run is data-parallel, rank 0 writes one table (each example once)."""
    import pandas as pd
    from typer.testing import CliRunner

    from gradsift.cli import app

    from ._dist import torchrun

    args = ["scores", "--scores", "el2n,forgetting,cum_loss,memorization", "--epochs", "2", "--width", "16",
            "--mem-models", "3"]
    r = torchrun(["-m", "gradsift", *args, "--run-dir", str(tmp_path / "two")], nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = pd.read_parquet(tmp_path / "two" / "scores.parquet")
    assert two.example_id.is_unique and len(two) == len(pd.read_parquet(tmp_path / "one" / "scores.parquet"))
    pd.testing.assert_frame_equal(two, pd.read_parquet(tmp_path / "one" / "scores.parquet"), atol=1e-5, rtol=1e-4)


def test_map_examples_gathers_shards_in_order_even_with_empty_shards():
    import numpy as np

    from gradsift.data import load_digits
    from gradsift.distributed import DistributedTrainer
    from gradsift.models import mlp

    tr, _ = load_digits()
    tr = tr.subset(np.arange(2))  # 3 ranks, 2 examples: rank 2's shard is empty

    def rank(comm):
        torch.manual_seed(0)
        t = DistributedTrainer(mlp(64, 10, width=4), tr, comm=comm, epochs=1, batch_size=2)
        calls = []

        def fn(pos):
            calls.append(len(pos))
            return pos.float()[:, None] * 2, None, t.y[pos]

        return t.map_examples(fn), calls

    for (values, none, labels), calls in run_threads(3, rank):
        assert values.flatten().tolist() == [0.0, 2.0] and none is None
        assert labels.tolist() == tr.y.tolist()
        assert calls in ([1], [])
