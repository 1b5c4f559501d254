"""``gradsift issues``: rank likely label issues and write the flagged ones to a CSV."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from ..errors import GradsiftError
from .common import UsageError, out_console, show_progress
from .options import (Dataset, Encoding, LabelColumn, LabelNoise, NoiseRate, Overwrite, Quiet, Resume, Seed, Width,
                      noise_rate_for)


def issues(
    dataset: Dataset = "digits",
    label_column: LabelColumn = "label",
    encoding: Encoding = "utf-8",
    label_noise: LabelNoise = "none",
    noise_rate: NoiseRate = None,
    method: str = typer.Option("combined", help="combined, oof_loss, oof_margin, cum_loss or learning_time"),
    folds: int = typer.Option(5, min=2, help="cross-validation folds"),
    epochs: int = typer.Option(20, min=1, help="epochs per fold model"),
    width: Width = 128,
    num_issues: Optional[int] = typer.Option(None, min=0, help="how many to flag (default: confident-learning count)"),
    out: Path = typer.Option(Path("issues.csv"), "--out", help="CSV: example_id, score, given_label, suggested_label "
                             "(and an HTML report beside it, same name with .html)"),
    seed: Seed = 0,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Rank likely label issues and write the flagged ones to a CSV, most suspect first.

    Uses a cross-validated small model: out-of-fold loss/margin and training dynamics.
    --noise-rate defaults to 0.2 with --label-noise symmetric/asymmetric.

    While it trains, the fold models checkpoint every epoch in OUT.checkpoints/ (removed
    when done); after a crash, the same command with --resume continues from there."""
    from .. import data as data_mod
    from ..experiments.label_noise import rank_label_issues
    from ..label_issues import METHODS
    from ..progress import progress_scope
    from ..report import write_report
    from ..rundir import JobCheckpoints, RunDir, atomic_path, checkpointing, fingerprint

    if method not in METHODS:  # before loading data
        raise UsageError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    noise_rate = noise_rate_for(label_noise, noise_rate, default=0.2)
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {out} must name a .csv file (the report goes beside it, with .html)")
    train_data, _ = data_mod.load(dataset, seed=seed, label_column=label_column, encoding=encoding)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    work = RunDir(out.with_name(out.stem + ".checkpoints"))
    try:
        work.start({"command": "issues", "dataset": dataset, "data": fingerprint(train_data),
                    "label_noise": label_noise, "noise_rate": noise_rate, "folds": folds, "epochs": epochs,
                    "width": width, "seed": seed}, resume=resume, overwrite=overwrite, job=True, may_differ=())
    except GradsiftError:
        if not work.contents():  # refused before anything was there: leave no empty folder behind
            shutil.rmtree(work.path, ignore_errors=True)
        raise
    try:
        with progress_scope(show_progress(quiet)), checkpointing(work):
            result = rank_label_issues(train_data, method=method, folds=folds, epochs=epochs, width=width,
                                       num_issues=num_issues, seed=seed)
    except BaseException:
        work.unlock()
        if not JobCheckpoints(work).exist():  # nothing to resume: leave no trace
            shutil.rmtree(work.path, ignore_errors=True)
        raise
    work.unlock()
    shutil.rmtree(work.path, ignore_errors=True)
    with atomic_path(out) as tmp:
        result.table.to_csv(tmp, index=False)
    if len(result.table):
        report = write_report(out, dataset=dataset, seed=seed)
        msg = f"flagged {len(result.table)} of {result.n_examples} examples; wrote {out} and {report}"
    else:
        msg = f"flagged none of {result.n_examples} examples; wrote {out} (empty, so no report)"
    if result.quality is not None:
        q = result.quality
        msg += (f"\n  injected {q['injected']} label errors: precision {q['precision']:.3f}, "
                f"recall {q['recall']:.3f}, AUROC {q['auroc']:.3f}")
    out_console.print(msg)
