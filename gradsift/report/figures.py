"""Matplotlib figures of the report (one function per picture; each returns a figure).

Same style as :mod:`gradsift.plotting`: Agg backend, light grid, epochs on the x axis.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from matplotlib.ticker import MaxNLocator

from ..plotting import log_y, plt

TRAIN, TEST = "tab:blue", "tab:orange"


def _axes(width: float = 5.0, height: float = 3.2, *, epochs: bool = True):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(alpha=0.3)
    if epochs:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def metric_curves(metrics: pd.DataFrame, metric: str, title: str):
    """``train_<metric>`` and ``test_<metric>`` (when present) against epoch."""
    fig, ax = _axes()
    for split, color in (("train", TRAIN), ("test", TEST)):
        col = f"{split}_{metric}"
        if col in metrics:
            ax.plot(metrics["epoch"], metrics[col], marker="o", ms=3, color=color, label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if metric == "acc":
        ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def coherence_curve(table: pd.DataFrame, title: str = "m-coherence of the probe batch"):
    """Whole-model m-coherence against epoch (``table``: epoch, m_coherence), log scale,
    with the orthogonal baseline 1."""
    fig, ax = _axes()
    ax.plot(table["epoch"], table["m_coherence"], marker="o", ms=3, color="tab:green", label="m-coherence")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="orthogonal (=1)")
    _log_if_positive(ax, table["m_coherence"])
    ax.set_xlabel("epoch (measured at its start; last = after training)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def coherence_layers(coh: pd.DataFrame):
    """m-coherence per layer against epoch (``coh``: epoch, layer, m_coherence)."""
    fig, ax = _axes(6.0, 3.6)
    layers = [lay for lay in coh["layer"].unique() if lay != "all"]
    cmap = plt.get_cmap("viridis", max(len(layers), 2))
    for k, layer in enumerate(layers):
        part = coh[coh["layer"] == layer].sort_values("epoch")
        ax.plot(part["epoch"], part["m_coherence"], color=cmap(k), label=str(layer))
    whole = coh[coh["layer"] == "all"].sort_values("epoch")
    if len(whole):
        ax.plot(whole["epoch"], whole["m_coherence"], color="black", lw=2, ls="--", label="whole model")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    _log_if_positive(ax, coh["m_coherence"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("m-coherence")
    ax.set_title("m-coherence per layer")
    ax.legend(fontsize=7, ncol=2 if len(layers) > 6 else 1)
    return fig


def _log_if_positive(ax, values: pd.Series) -> None:
    """Log scale when all values are positive and span more than a factor of 10."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if len(v) and (v > 0).all() and v.max() > 10 * v.min():
        log_y(ax)


def score_histogram(values: np.ndarray, name: str, *, flagged: np.ndarray | None = None):
    """Histogram of one per-example score; ``flagged`` (bool per example, e.g. known
    corrupted labels) is drawn as a second, stacked colour."""
    fig, ax = _axes(4.2, 2.8, epochs=False)
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    bins: np.ndarray | int = 10
    if ok.any():
        lo, hi = v[ok].min(), v[ok].max()
        if np.all(v[ok] == np.round(v[ok])) and hi - lo <= 50:  # counts, epochs: one bar per value
            bins = np.arange(lo - 0.5, hi + 1.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            bins = np.histogram_bin_edges(v[ok], bins=30)
    if flagged is not None and flagged[ok].any():
        ax.hist([v[ok & ~flagged], v[ok & flagged]], bins=bins, stacked=True,
                color=["tab:blue", "tab:red"], label=["clean label", "corrupted label"])
        ax.legend(fontsize=7)
    else:
        ax.hist(v[ok], bins=bins, color="tab:blue")
    ax.set_title(f"{name} (n={int(ok.sum())})", fontsize=10)
    ax.set_ylabel("examples")
    return fig


def example_drawing(x: np.ndarray, shape: Sequence[int] | None):
    """One example: an image for 2-D shapes (or square flat vectors), a line plot for 1-D."""
    x = np.asarray(x, dtype=float)
    shape = tuple(shape) if shape else None
    if shape is None and x.ndim == 1 and math.isqrt(x.size) ** 2 == x.size and x.size >= 16:
        shape = (math.isqrt(x.size),) * 2
    if shape is not None and len(shape) >= 2 and math.prod(shape) == x.size:
        img = x.reshape(shape)
        img = img if img.ndim == 2 else img.reshape(img.shape[0], -1)
        fig, ax = plt.subplots(figsize=(1.8, 1.8))
        ax.imshow(img, cmap="gray_r", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    fig, ax = plt.subplots(figsize=(2.2, 1.5))
    ax.plot(x.reshape(-1), color="black", lw=1)
    ax.set_xticks([])
    ax.tick_params(labelsize=6)
    return fig


def pruning_curves(curves: Mapping[str, pd.DataFrame], title: str = "pruning curves"):
    """Test accuracy against fraction of the data kept, one line per score.

    ``curves``: score -> DataFrame with ``fraction``, ``mean`` and optional ``std``.
    """
    fig, ax = _axes(5.6, 3.6, epochs=False)
    for name, df in curves.items():
        df = df.sort_values("fraction")
        style = dict(color="gray", ls="--") if name == "random" else {}
        ax.errorbar(df["fraction"], df["mean"], yerr=df["std"] if "std" in df else None,
                    marker="o", ms=3, capsize=2, label=name, **style)
    ax.set_xlabel("fraction of training data kept")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def privacy_curve(metrics: pd.DataFrame, column: str = "epsilon", target: float | None = None):
    """Privacy spent (epsilon) against epoch."""
    fig, ax = _axes(4.6, 3.0)
    ax.plot(metrics["epoch"], metrics[column], marker="o", ms=3, color="tab:purple", label="epsilon spent")
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    ax.set_title("privacy spent")
    ax.legend(fontsize=8)
    return fig
