"""Many-model jobs as Ray tasks (local Ray, 2 CPUs): the same results as in this process."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradsift.data import load_digits
from gradsift.backends import InProcess
from gradsift.ray_backend import RayBackend
from gradsift.experiments.pruning_curve import PruningCurveConfig, run_pruning_curve
from gradsift.scores import memorization_scores, mlp_factory

ray = pytest.importorskip("ray")


def test_ray_gives_the_in_process_memorization_scores_and_pruning_curve(tmp_path):
    tr, _ = load_digits()
    tr = tr.subset(np.arange(240))
    kw = dict(n_models=5, fraction=0.5, epochs=2, seed=3)
    # 5 models in vmap tasks of 2, 2 and 1 members, and one model per task on the loop path
    local = memorization_scores(tr, mlp_factory(tr, width=16), **kw)
    local_loop = memorization_scores(tr, mlp_factory(tr, width=16), vectorize=False, **kw)
    assert local.index.name == "example_id" and local["mem"].abs().max() > 0
    curve = PruningCurveConfig(dataset="digits", scores=("el2n", "random"), fractions=(0.5, 1.0), seeds=2,
                               width=16, epochs=1, diet_inits=2, diet_epochs=1)
    want = run_pruning_curve(curve, tmp_path / "local")
    backend = RayBackend(num_cpus=2)
    try:
        assert backend.workers == 2
        got = memorization_scores(tr, mlp_factory(tr, width=16), backend=backend, **kw)
        got_loop = memorization_scores(tr, mlp_factory(tr, width=16), backend=backend, vectorize=False, **kw)
        got_curve = run_pruning_curve(curve, tmp_path / "ray", backend=backend)
    finally:
        backend.close()
    assert not ray.is_initialized()
    pd.testing.assert_frame_equal(got, local)
    pd.testing.assert_frame_equal(got_loop, local_loop)
    assert got_curve["results"] == want["results"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "scores.parquet"),
                                  pd.read_parquet(tmp_path / "local" / "scores.parquet"))
    assert json.loads((tmp_path / "ray" / "summary.json").read_text())["results"] == want["results"]


def test_in_process_backend_and_member_ids_reproduce_the_whole_job():
    from gradsift.scores import subset_masks, train_members

    tr, _ = load_digits()
    tr = tr.subset(np.arange(120))
    x, y = tr.tensors()
    masks = subset_masks(len(tr), 4, 0.5, seed=0)
    whole = train_members(mlp_factory(tr, width=8), x, y, masks, epochs=1)
    tasks = train_members(mlp_factory(tr, width=8), x, y, masks, epochs=1, backend=InProcess(), members_per_task=3)
    part = train_members(mlp_factory(tr, width=8), x, y, masks[2:], epochs=1, member_ids=[2, 3])
    for a, b in zip(whole, tasks):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert (pa == pb).all()
    for a, b in zip(whole[2:], part):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert (pa == pb).all()
