"""Every registered aggregator through the shared harness (tests/aggregate_harness.py):
local form == numpy, layer-wise == materialized, sharded == one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import gradsift as gs
from gradsift import aggregate as A
from gradsift.aggregate import AGGREGATORS, aggregator_from_spec

from .aggregate_harness import (CASES, check_layerwise, check_local, check_sharded,
                                check_step_sharded, random_grads)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
shapes = st.integers(1, 13).flatmap(
    lambda b: st.tuples(
        arrays(np.float32, st.tuples(st.just(b), st.integers(1, 4), st.integers(1, 3)), elements=finite),
        arrays(np.float32, st.tuples(st.just(b), st.integers(1, 3)), elements=finite),
    )
)

#: Registered names the harness covers through CASES, or elsewhere (file named).
ELSEWHERE = {"sven": "test_sven.py", "dp_sgd": "test_privacy.py",
             "gaussian_noise": "test_privacy.py", "rm3": "test_aggregate.py",
             "sgd": "alias of mean", "median": "alias of coordinate_median"}


def test_every_registered_aggregator_is_covered():
    covered = {spec.split("+")[-1].split(":")[0] for spec in CASES}
    covered |= {part.split(":")[0] for spec in CASES for part in spec.split("+")}
    missing = set(AGGREGATORS) - covered - set(ELSEWHERE)
    assert not missing, f"add a CASES entry (spec + numpy reference) for {sorted(missing)}"


@pytest.mark.parametrize("spec", list(CASES))
@settings(max_examples=25, deadline=None)
@given(shapes)
def test_local_form_equals_numpy(spec, xs):
    w, b = xs
    check_local(spec, {"w": w, "b": b})


@pytest.mark.parametrize("spec", list(CASES))
def test_layerwise_equals_materialized(spec):
    check_layerwise(spec)


@pytest.mark.parametrize("spec", list(CASES))
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_equals_one_process(spec, world_size):
    for b in (1, 2, 5, 12):
        check_sharded(spec, random_grads(b, seed=b, ties=b == 12), world_size)


@pytest.mark.parametrize("spec", ["mean", "clip:max_norm=0.5+mean", "m3",
                                  "gaf:micro_batches=4,threshold=0.97",
                                  "clip:max_norm=0.5,per_layer=True+mean+rm3"])
def test_step_update_layerwise_across_ranks(spec):
    check_step_sharded(spec, world_size=2, b=12, expect="layerwise")


@pytest.mark.parametrize("spec", ["winsorize:c=1", "coordinate_median", "rm3"])
def test_step_update_across_ranks_other_paths(spec):
    check_step_sharded(spec, world_size=2, b=11,
                       expect="plain" if spec == "rm3" else "materialized")


def test_step_update_paths():
    from .aggregate_harness import CE, small_model

    model, x, y = small_model()
    assert A.step_update(model, CE, x, y, "rm3").path == "plain"
    assert A.step_update(model, CE, x, y, "mean").path == "plain"
    assert A.step_update(model, CE, x, y, "clip:max_norm=1+mean").path == "layerwise"
    assert A.step_update(model, CE, x, y, "m3").path == "layerwise"
    r = A.step_update(model, CE, x, y, "mean", keep_grads=True)
    assert r.path == "materialized" and r.grads["4.weight"].shape == (20, 16, 144)
    prelu = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3), torch.nn.PReLU())
    assert A.step_update(prelu, CE, x, y, "m3").path == "materialized"


def test_custom_aggregator_runs_layerwise_and_sharded_without_other_changes():
    """An aggregator is one factory: a weighted-sums form gives every path."""

    def weights(b, dtype, device):  # later examples count more
        w = torch.arange(1, b + 1, dtype=dtype, device=device)
        return (w / w.sum()).unsqueeze(0)

    form = A.WeightedSums(weights, lambda sums: {n: s[0] for n, s in sums.items()})
    agg = A.base.reducer("ramp", "ramp", weighted_sums=form)
    check_layerwise(agg)
    check_sharded(agg, random_grads(7, seed=1), 3)
    g = random_grads(5, seed=2)
    u, _ = agg.update(g, ())
    w = torch.arange(1, 6, dtype=torch.float64) / 15
    torch.testing.assert_close(u["w"], (w.view(-1, 1, 1) * g["w"]).sum(0))


def test_masking_runs_layerwise():
    from .aggregate_harness import small_model

    model, x, y = small_model()
    asg = gs.masking.assign_parameters(model, {"a": ["7.*"], "b": ["4.*"]}, shared=["0.*", "1.*", "5.*"])
    tags = torch.tensor([0, 1, -1, 0] * 5)
    agg = A.chain(A.group_masking(asg, tags), A.clip(0.7), A.mean())
    check_layerwise(agg, model, x, y, positions=torch.arange(20))


# ---------------------------------------------------------------- specs

@pytest.mark.parametrize("spec, match", [
    ("winsorize:c=1.5", "c=1.5 should be int"),
    ("winsorize:c=True", "c=True should be int"),
    ("clip:max_norm=True", "should be float"),
    ("clip:max_norm=1,per_layer=1", "per_layer=1 should be bool"),
    ("winsorize:c=1,c=2", "given twice"),
    ("winsorize:q=2", "no option 'q'.*options: c"),
    ("clip", r"per-example gradients; chain a reducer after it, e.g. 'clip\+mean'"),
    ("clip:max_norm=1", "chain a reducer after it"),
    ("mean+clip:max_norm=1", r"per-example stages go before the reducer: 'clip:max_norm=1\+mean'"),
    ("m3+m3", r"give it once: 'm3'"),
    ("rm3+mean", r"batch stages go after the reducer: 'mean\+rm3'"),
    ("clip:max_norm=1+rm3", r"put a reducer before it: 'clip:max_norm=1\+mean\+rm3'"),
    ("nope", "unknown aggregator 'nope'.*Known: clip, coordinate_median"),
])
def test_spec_errors_name_the_fix(spec, match):
    with pytest.raises(gs.SpecError, match=match):
        aggregator_from_spec(spec)


def test_specs_accept_ints_for_floats_and_none():
    assert aggregator_from_spec("clip:max_norm=2+mean").parts[0].options["max_norm"] == 2.0
    assert aggregator_from_spec("gaf:micro_batches=None").options["micro_batches"] is None
    assert aggregator_from_spec("sgd").name == "mean"
    assert AGGREGATORS.describe()["gaf"].startswith("Gradient Agreement Filtering")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        A.register_aggregator("mean", lambda: A.m3())


def test_layerwise_with_recurrent_and_embedding_layers():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.r, self.l = torch.nn.Embedding(20, 8), torch.nn.GRU(8, 8, batch_first=True), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.l(self.r(self.e(x))[0][:, -1])

    torch.manual_seed(0)
    x, y = torch.randint(0, 20, (12, 5)), torch.randint(0, 3, (12,))
    for spec in ["m3", "gaf:micro_batches=3", "clip:max_norm=0.5+mean", "winsorize:c=1"]:
        check_layerwise(spec, Net(), x, y)
