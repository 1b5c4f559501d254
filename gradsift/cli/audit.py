"""``gradsift audit``: label issues, outliers, near-duplicates and the data map of a data set."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import out_console, show_progress
from .options import Dataset, LabelNoise, NoiseRate, OutDir, Quiet, Seed, Width, noise_rate_for


def audit(
    dataset: Dataset = "digits",
    out: OutDir = Path("runs/audit"),
    label_noise: LabelNoise = "none",
    noise_rate: NoiseRate = None,
    folds: int = typer.Option(5, min=2, help="cross-validation folds"),
    epochs: int = typer.Option(20, min=1, help="epochs per fold model"),
    width: Width = 128,
    label_threshold: str = typer.Option("confident", help="label cut-off: confident (confident learning's "
                                        "per-class thresholds) or aum (AUM threshold samples)"),
    outlier_space: str = typer.Option("input", help="space whose k-NN distance flags outliers: input, embedding "
                                      "(the fold models' penultimate layer) or both (the larger score)"),
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Audit a data set: one row per example with label_score/is_label/suggested_label,
    outlier_score/is_outlier, near_duplicate_score/is_near_duplicate/near_duplicate_of and
    the data map; write OUT/audit.parquet, OUT/summary.json, OUT/datamap.png and
    OUT/explorer.html (an offline page to look at the examples)."""
    from .. import data as data_mod
    from ..experiments.audit import run_audit_experiment
    from ..progress import progress_scope

    rate = noise_rate_for(label_noise, noise_rate, default=0.2)
    train, _ = data_mod.load(dataset, seed=seed)
    train = data_mod.corrupt(train, label_noise, rate, seed=seed)
    with progress_scope(show_progress(quiet)):
        summary = run_audit_experiment(train, out, folds=folds, epochs=epochs, width=width,
                                       label_threshold=label_threshold, outlier_space=outlier_space, seed=seed)
    issues = summary["issues"]
    msg = (f"{summary['n']} examples: {issues['label']} label issues, {issues['outlier']} outliers, "
           f"{issues['near_duplicate']} near-duplicates; class imbalance {summary['imbalance_ratio']:.2f}")
    if "injected" in summary:
        inj = summary["injected"]
        msg += (f"\n  injected {inj['label_errors']} label errors: precision {inj['precision']:.3f}, "
                f"recall {inj['recall']:.3f}, AUROC {inj['auroc']:.3f}")
    out_console.print(msg)
    out_console.print(f"wrote {', '.join(str(out / f) for f in summary['files'])}")
