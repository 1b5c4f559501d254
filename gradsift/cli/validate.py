"""``gradsift validate-scores``: cheap memorization proxies against Feldman-Zhang memorization."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import many_model_backend, out_console, show_progress, split_list
from .options import Backend, Dataset, OutDir, Quiet, RayAddress, Seed, Width


def validate_scores(
    dataset: Dataset = "digits",
    out: OutDir = Path("runs/validate"),
    scores: str = typer.Option("loss,el2n,grand,grand_init,forgetting,learning_time,cum_loss,aum,confidence,"
                               "variability,self_influence,alignment", help="comma list of registered scores "
                               "(and grand_init: GraNd at initialization)"),
    n_train: int = typer.Option(600, min=10, help="training examples used"),
    noise_rate: float = typer.Option(0.1, min=0.0, max=0.9, help="fraction of labels flipped (symmetric)"),
    mem_models: int = typer.Option(64, min=2, help="subset models for the ground truth (Feldman-Zhang)"),
    epochs: int = typer.Option(40, min=1, help="epochs per model (long enough for the models to memorize)"),
    seeds: int = typer.Option(2, min=1, help="training seeds per cheap score"),
    width: Width = 128,
    seed: Seed = 0,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    quiet: Quiet = False,
) -> None:
    """Compute Feldman-Zhang memorization from MEM_MODELS subset models (vmapped) as ground
    truth, then for every cheap score its Spearman correlation with it and its AUROC for the
    injected label errors (mean over seeds, 95% bootstrap intervals); write
    OUT/validation.csv, OUT/summary.json and OUT/validate_scores.png."""
    from ..experiments.validate_scores import ValidateScoresConfig, run_validate_scores
    from ..progress import progress_scope

    config = ValidateScoresConfig(dataset=dataset, scores=tuple(split_list(scores)), n_train=n_train,
                                  noise_rate=noise_rate, mem_models=mem_models, epochs=epochs, seeds=seeds,
                                  width=width, seed=seed, label_noise="symmetric" if noise_rate > 0 else "none")
    with many_model_backend(backend, ray_address) as (runner, _), progress_scope(show_progress(quiet)):
        summary = run_validate_scores(config, out, backend=runner)
    table = Table(title=f"cheap scores vs memorization ({mem_models} models) and label errors on {dataset}")
    for col in ("score", "Spearman (95% CI)", "AUROC (95% CI)"):
        table.add_column(col, justify="left" if col == "score" else "right")
    for r in summary["rows"]:
        table.add_row(r["score"], f"{r['spearman']:.3f} [{r['spearman_lo']:.3f}, {r['spearman_hi']:.3f}]",
                      f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]")
    out_console.print(table)
    for w in summary["warnings"]:
        out_console.print(f"[yellow]warning[/]: {w}")
    out_console.print(f"wrote {out / 'validation.csv'}, {out / 'summary.json'}, {out / 'validate_scores.png'}")
