"""Matplotlib figures for experiments (written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .rundir import atomic_path  # noqa: E402


def log_y(ax) -> None:
    """Log-scale y axis with plain ``%g`` tick labels (the default ``10^k`` labels go
    through matplotlib's mathtext parser, which made small figures take half a second)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_memorization(summary: dict, path: str | Path) -> Path:
    """Write :func:`memorization_figure` to ``path``."""
    return save_figure(memorization_figure(summary), path)


def memorization_figure(summary: dict):
    """Train/test accuracy and m-coherence per epoch, one row per label kind."""
    labels = [lab for lab in ("real", "random") if any(r["labels"] == lab for r in summary["runs"])]
    fig, axes = plt.subplots(len(labels), 3, figsize=(13, 3.6 * len(labels)), squeeze=False, layout="constrained")
    colors = {"mean": "tab:blue", "winsorize": "tab:orange", "m3": "tab:green"}
    for row, lab in zip(axes, labels):
        for run in (r for r in summary["runs"] if r["labels"] == lab):
            c = colors.get(run["aggregator"])
            name = run["aggregator_spec"]
            ep = range(1, len(run["train_acc_curve"]) + 1)
            row[0].plot(ep, run["train_acc_curve"], color=c, label=name)
            row[1].plot(ep, run["test_acc_curve"], color=c, label=name)
            row[2].plot(range(1, len(run["coherence"]) + 1), run["coherence"], color=c, label=name)
        row[0].set_title(f"{lab} labels: train accuracy")
        row[1].set_title(f"{lab} labels: test accuracy")
        row[2].set_title(f"{lab} labels: m-coherence (probe, start of epoch)")
        row[2].axhline(1.0, color="gray", ls=":", lw=1, label="orthogonal (=1)")
        log_y(row[2])
        for ax in row:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        row[0].set_ylim(0, 1.02)
        row[1].set_ylim(0, 1.02)
        row[0].legend(fontsize=8)
        row[2].legend(fontsize=8)
    fig.suptitle(f"memorization experiment ({summary['config']['dataset']})")
    return fig


def plot_pruning_curve(summary: dict, path: str | Path) -> Path:
    """Test accuracy against the fraction kept, one line per curve: the mean over seeds
    with its 95% confidence interval (``ci95``; the std where a summary has none).
    ``random`` is dashed grey, keep-easy curves are dotted."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, by_frac in summary["results"].items():
        fr = sorted(by_frac, key=float)
        mean = np.array([by_frac[f]["test_acc_mean"] for f in fr])
        lo = np.array([(by_frac[f].get("ci95") or [None])[0] for f in fr], dtype=float)
        hi = np.array([(by_frac[f].get("ci95") or [None, None])[1] for f in fr], dtype=float)
        std = np.array([by_frac[f]["test_acc_std"] for f in fr])
        lo = np.where(np.isnan(lo), mean - std, lo)
        hi = np.where(np.isnan(hi), mean + std, hi)
        style = dict(ls="--", color="gray") if name == "random" else dict(ls=":") if name.endswith("(easy)") else {}
        ax.errorbar([float(f) for f in fr], mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3, label=name,
                    **style)
    cfg = summary["config"]
    ax.set_xlabel("fraction of training data kept")
    ax.set_ylabel("test accuracy (mean, 95% CI)")
    ax.set_title(f"pruning curve ({cfg['dataset']}, keep {cfg['prefer']}, {cfg['seeds']} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
