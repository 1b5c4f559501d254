"""gaf (Gradient Agreement Filtering): the filter rule, and the shared harness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsift import aggregate as A

from .aggregate_harness import check_layerwise, check_local, check_sharded, np_gaf, random_grads


def test_disagreeing_micro_batch_is_filtered():
    # 4 micro-batches of 2 examples; the third points the other way
    g = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [1.1, 0.2],
                      [-1.0, 0.0], [-1.2, 0.1], [1.0, 0.3], [0.8, 0.1]], dtype=torch.float64)
    u, _ = A.gaf(micro_batches=4, threshold=0.5).update({"w": g}, ())
    kept = torch.stack([g[0:2].mean(0), g[2:4].mean(0), g[6:8].mean(0)]).mean(0)
    torch.testing.assert_close(u["w"], kept)
    # threshold 2 keeps everything: the mean
    u, _ = A.gaf(micro_batches=4, threshold=2.0).update({"w": g}, ())
    torch.testing.assert_close(u["w"], g.mean(0))


def test_cosines_span_all_parameters():
    # each parameter alone agrees, together they do not: the filter sees the whole model
    grads = {"a": torch.tensor([[1.0], [0.2]]), "b": torch.tensor([[0.0], [-3.0]])}
    u, _ = A.gaf(micro_batches=2, threshold=0.5).update(grads, ())
    torch.testing.assert_close(u["a"], torch.tensor([1.0]))
    torch.testing.assert_close(u["b"], torch.tensor([0.0]))


@pytest.mark.parametrize("micro_batches, threshold", [(2, 0.9), (5, 1.0), (None, 0.97)])
def test_gaf_through_the_harness(micro_batches, threshold):
    spec = f"gaf:micro_batches={micro_batches},threshold={threshold}"
    ref = lambda g: np_gaf(g, micro_batches, threshold)  # noqa: E731
    rng = np.random.default_rng(0)
    check_local(spec, {"w": rng.normal(size=(11, 3, 2)) + 0.3, "b": rng.normal(size=(11, 4))}, ref)
    check_layerwise(spec)
    check_sharded(spec, random_grads(9, seed=3), 2)


def test_bad_options():
    with pytest.raises(ValueError, match="micro_batches"):
        A.gaf(micro_batches=0)
    with pytest.raises(ValueError, match="threshold"):
        A.gaf(threshold=3)
