"""Data maps: confidence, variability and correctness from the dynamics recorder."""

import numpy as np
import pandas as pd

import gradsift as gs
from gradsift.datamap import data_map_regions, plot_data_map
from gradsift.scores.dynamics import data_map


def test_data_map_by_hand():
    probs = np.array([[0.9, 0.2, 0.5], [0.7, 0.2, 0.1], [0.8, 0.2, 0.9]])  # [T=3, N=3]
    correct = probs > 0.5
    conf, var, corr = data_map(probs, correct)
    np.testing.assert_allclose(conf, [0.8, 0.2, 0.5])
    np.testing.assert_allclose(var, [np.std([0.9, 0.7, 0.8]), 0.0, np.std([0.5, 0.1, 0.9])], atol=1e-12)
    np.testing.assert_allclose(corr, [1.0, 0.0, 1 / 3])


def test_recorder_writes_the_map_and_the_figure_marks_errors(tmp_path):
    train, _ = gs.data.load_digits()
    noisy = gs.data.symmetric_noise(train.subset(np.arange(300)), 0.2, seed=0)
    rec = gs.DynamicsRecorder()
    torch_model = gs.models.mlp(64, 10, width=32)
    gs.fit(torch_model, noisy, epochs=4, batch_size=32, recorders=[rec], progress=False)
    table = rec.scores()
    for col in ("confidence", "variability", "correctness"):
        assert table[col].between(0, 1).all()
    regions = data_map_regions(table)
    assert set(regions) <= {"easy-to-learn", "ambiguous", "hard-to-learn"}
    flipped = noisy.example_ids[noisy.corrupted]
    # injected errors sit lower on the map than the rest
    assert table.loc[flipped, "confidence"].mean() < table.drop(flipped)["confidence"].mean()
    path = plot_data_map(table, tmp_path / "map.png", marked=flipped)
    assert path.stat().st_size > 10_000
