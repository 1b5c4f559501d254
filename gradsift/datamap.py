"""Data Maps (Swayamdipta et al. 2020, "Dataset Cartography"): every training example
placed by how its true-label probability behaves over training.

From the probabilities ``p_t = p(y_i | x_i)`` the model gave example ``i`` at each of the
``T`` epochs (when it was presented, before the step; recorded by
:class:`gradsift.scores.DynamicsRecorder`):

* ``confidence``  = mean_t p_t;
* ``variability`` = std_t p_t;
* ``correctness`` = fraction of epochs in which it was classified correctly.

Regions (relative to the data set, as in the paper's figures): *ambiguous* is the third
with the highest variability; of the rest, *hard-to-learn* is below the 33rd percentile of
confidence and *easy-to-learn* the others. Mislabelled examples gather in hard-to-learn.

    rec = gs.DynamicsRecorder(); gs.fit(model, train, recorders=[rec])
    table = rec.scores()                               # confidence, variability, correctness
    plot_data_map(table, "map.png", marked=train.example_ids[train.corrupted])
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

REGIONS = ("easy-to-learn", "ambiguous", "hard-to-learn")

__all__ = ["REGIONS", "data_map_regions", "plot_data_map"]


def data_map_regions(table: pd.DataFrame) -> pd.Series:
    """The region of every row of a table with ``confidence`` and ``variability``
    columns: a Series of :data:`REGIONS` names, same index."""
    conf = table["confidence"].to_numpy(dtype=float)
    var = table["variability"].to_numpy(dtype=float)
    ambiguous = var >= np.nanquantile(var, 2 / 3)
    hard = ~ambiguous & (conf <= np.nanquantile(conf, 1 / 3))
    region = np.where(ambiguous, REGIONS[1], np.where(hard, REGIONS[2], REGIONS[0]))
    return pd.Series(region, index=table.index, name="region")


def plot_data_map(table: pd.DataFrame, path: str | Path, *, marked: Sequence[int] | None = None,
                  title: str = "Data map") -> Path:
    """Draw the data map: variability (x) against confidence (y), colour = correctness,
    the three regions outlined, and the ``example_id`` s in ``marked`` (e.g. injected
    label errors) as red crosses. Writes a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    regions = data_map_regions(table)
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    sc = ax.scatter(table["variability"], table["confidence"], c=table["correctness"], cmap="viridis",
                    s=8, alpha=0.7, vmin=0, vmax=1, linewidths=0)
    fig.colorbar(sc, ax=ax, label="correctness")
    var_cut = float(np.nanquantile(table["variability"], 2 / 3))
    conf_cut = float(np.nanquantile(table["confidence"], 1 / 3))
    ax.axvline(var_cut, color="grey", ls="--", lw=1)
    ax.plot([0, var_cut], [conf_cut, conf_cut], color="grey", ls="--", lw=1)
    counts = regions.value_counts()
    ax.text(0.02, 0.98, f"easy-to-learn ({counts.get(REGIONS[0], 0)})", transform=ax.transAxes, va="top")
    ax.text(0.98, 0.5, f"ambiguous ({counts.get(REGIONS[1], 0)})", transform=ax.transAxes, ha="right")
    ax.text(0.02, 0.02, f"hard-to-learn ({counts.get(REGIONS[2], 0)})", transform=ax.transAxes, va="bottom")
    if marked is not None and len(marked):
        m = table.loc[table.index.isin(list(marked))]
        ax.scatter(m["variability"], m["confidence"], marker="x", color="red", s=18, lw=0.8,
                   label=f"marked ({len(m)})")
        ax.legend(loc="upper right")
    ax.set_xlabel("variability (std of p(y|x) over epochs)")
    ax.set_ylabel("confidence (mean p(y|x) over epochs)")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
