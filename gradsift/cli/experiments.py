"""The experiments: ``gradsift memorization`` and ``gradsift pruning-curve``. The
experiments themselves live in :mod:`gradsift.experiments`; these commands run them and
print their tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import UsageError, many_model_backend, out_console, show_progress, split_list, write_experiment_report
from .options import (Backend, ClassBalanced, Dataset, Epochs, MemModels, OutDir, Overwrite, Quiet, RayAddress,
                      Resume, Seed, Width)


def memorization(
    dataset: Dataset = "digits",
    out: OutDir = Path("runs/memorization"),
    epochs: Optional[int] = typer.Option(None, min=1, help="epochs per run (default: the experiment's)"),
    width: Optional[int] = typer.Option(None, min=1, help="MLP hidden width"),
    lr: Optional[float] = typer.Option(None, min=0.0, help="SGD learning rate"),
    momentum: Optional[float] = typer.Option(None, min=0.0, help="SGD momentum"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="batch size"),
    winsorize_c: Optional[int] = typer.Option(None, "--winsorize-c", min=0, help="c of winsorize (values clipped at each end)"),
    n_train: Optional[int] = typer.Option(None, min=1, help="use only this many training examples"),
    seed: Seed = 0,
    workers: Optional[int] = typer.Option(None, min=1, help="processes training the six runs side by side "
                                          "(default: one per core; 1: one after the other)"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train the same MLP on real and random labels with SGD (mean), winsorize and m3;
    write summary.json, a plot and a table of accuracy and m-coherence."""
    from ..experiments.memorization import MemorizationConfig, run_memorization

    overrides = dict(epochs=epochs, width=width, lr=lr, momentum=momentum, batch_size=batch_size,
                     winsorize_c=winsorize_c, n_train=n_train)
    config = MemorizationConfig(dataset=dataset, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    summary = run_memorization(config, out, progress=show_progress(quiet), resume=resume, overwrite=overwrite,
                               workers=workers)
    table = Table(title=f"memorization on {dataset} ({config.epochs} epochs)")
    for col in ("labels", "aggregator", "train acc", "test acc", "m-coh (init)", "m-coh (ep 2)", "m-coh (end)"):
        table.add_column(col, justify="right" if "acc" in col or "coh" in col else "left")
    for r in summary["runs"]:
        c = r["coherence"]
        table.add_row(r["labels"], r["aggregator_spec"], f"{r['train_acc']:.3f}", f"{r['test_acc']:.3f}",
                      f"{c[0]:.2f}", f"{c[min(1, len(c) - 1)]:.2f}", f"{c[-1]:.2f}")
    out_console.print(table)
    for k, v in summary["findings"].items():
        out_console.print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    report = write_experiment_report(out)
    out_console.print(f"wrote {out / 'summary.json'}, {out / 'memorization.png'} and {report}")


def pruning_curve(
    dataset: Dataset = "mnist1d",
    scores: str = typer.Option("el2n,grand,forgetting,memorization,random", help="comma list of scores"),
    fractions: str = typer.Option("0.3,0.5,0.7,1.0", help="comma list of fractions kept"),
    seeds: int = typer.Option(3, min=1, help="training seeds per point (2 or more for confidence intervals and tests)"),
    epochs: Epochs = 15,
    width: Width = 128,
    mem_models: MemModels = 16,
    keep: str = typer.Option("both", "--keep", help="which end of each score to keep: hard (Data Diet), easy, or "
                             "both (Sorscher et al.: hard helps with abundant data, easy with scarce data)"),
    class_balanced: ClassBalanced = False,
    out: OutDir = Path("runs/pruning"),
    seed: Seed = 0,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Accuracy vs fraction of data kept, per score: write summary.json and a plot.

    Scores the training set, keeps fractions of it by each score, retrains with several
    seeds; summary.json maps score -> fraction -> test accuracy mean/std over seeds."""
    from ..distributed import launched_by_torchrun
    from ..experiments.pruning_curve import PREFER, PruningCurveConfig, format_point, run_pruning_curve
    from ..progress import progress_scope

    try:
        fr = tuple(float(f) for f in split_list(fractions))
    except ValueError:
        raise UsageError(f"--fractions must be a comma list of numbers, got '{fractions}'") from None
    config = PruningCurveConfig(dataset=dataset, scores=tuple(split_list(scores)), fractions=fr, seeds=seeds,
                                epochs=epochs, width=width, mem_models=mem_models,
                                prefer=keep, class_balanced=class_balanced, seed=seed)
    if keep not in PREFER:
        raise UsageError(f"--keep must be one of {', '.join(PREFER)}, got '{keep}'")
    if launched_by_torchrun():
        raise UsageError("pruning-curve does not run under torchrun; use --backend ray to spread its models")
    with many_model_backend(backend, ray_address) as (runner, _), progress_scope(show_progress(quiet)):
        summary = run_pruning_curve(config, out, backend=runner, resume=resume, overwrite=overwrite)
    table = Table(title=f"pruning curve on {dataset}: test accuracy, mean ± 95% CI half-width over {seeds} seeds "
                        "(↑/↓: paired t-test against random, p < 0.05)")
    table.add_column("curve")
    for f in sorted(fr):
        table.add_column(f"keep {f:g}", justify="right")
    for name, by_frac in summary["results"].items():
        table.add_row(name, *[format_point(by_frac[str(f)]) for f in sorted(fr)])
    out_console.print(table)
    report = write_experiment_report(out)
    out_console.print(f"wrote {out / 'summary.json'}, {out / 'pruning_curve.png'} and {report}")
