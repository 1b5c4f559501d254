"""``gradsift scores`` (score every training example into a run directory) and
``gradsift prune`` (select a subset of a scored run)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..scores import score_names
from .common import UsageError, many_model_backend, out_console, show_progress, split_list
from .options import (Backend, ClassBalanced, Dataset, Encoding, KeepHard, LabelColumn, LabelNoise, MemModels,
                      NoiseRate, Overwrite, Quiet, RayAddress, Resume, RunDirOption, Seed, Width, noise_rate_for)


def scores(
    dataset: Dataset = "digits",
    label_column: LabelColumn = "label",
    encoding: Encoding = "utf-8",
    run_dir: RunDirOption = Path("runs/scores"),
    scores: str = typer.Option("el2n,grand,forgetting,memorization",
                               help=f"comma list of {', '.join(score_names())}"),
    label_noise: LabelNoise = "none",
    noise_rate: NoiseRate = None,
    epochs: int = typer.Option(15, min=1, help="training epochs (dynamics, memorization models)"),
    width: Width = 128,
    mem_models: MemModels = 16,
    seed: Seed = 0,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Score every training example; write RUN/scores.parquet (one row per example_id).

    Every training checkpoints per epoch (or per model) in RUN/checkpoints/; after a crash,
    the same command with --resume continues from there and gives the same table.

    With --backend ray the models behind el2n/grand and memorization are Ray tasks. Started
    by torchrun, the ranks share those models and train the dynamics run data-parallel;
    rank 0 writes. The table is the same either way.

    Into a run directory that already holds scores of the same data and options, the new
    columns are added; any other run there is refused (unless --overwrite)."""
    from .. import data as data_mod
    from ..experiments.pruning_curve import PruningCurveConfig, compute_scores
    from ..progress import progress_scope
    from ..distributed import launched_by_torchrun
    from ..rundir import JobCheckpoints, RunDir, checkpointing, fingerprint

    if resume and launched_by_torchrun():
        raise UsageError("--resume does not run under torchrun (its checkpoints are this process's); "
                         "resume without torchrun, or use --backend ray")
    noise_rate = noise_rate_for(label_noise, noise_rate)
    names = split_list(scores)
    config = PruningCurveConfig(dataset=dataset, scores=tuple(names), epochs=epochs, width=width,
                                mem_models=mem_models, seed=seed)
    train_data, _ = data_mod.load(dataset, seed=seed, label_column=label_column, encoding=encoding)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    run = RunDir(run_dir)
    with many_model_backend(backend, ray_address) as (runner, comm):
        writer = comm is None or comm.rank == 0
        if writer:  # refuse a run directory holding another run before the work
            before = (run.read_manifest().get("config") or {}).get("scores") or []
            run_config = {"command": "scores", "dataset": dataset, "data": fingerprint(train_data),
                          "label_noise": label_noise, "noise_rate": noise_rate, "epochs": epochs, "width": width,
                          "mem_models": mem_models, "seed": seed,
                          "scores": sorted(set(before) | set(names)) if not overwrite else names}
            run.start(run_config, merge=not overwrite, overwrite=overwrite, resume=resume, may_differ={"scores"},
                      job=True, seed=seed)
        try:
            with progress_scope(show_progress(quiet) and writer), checkpointing(run if comm is None else None):
                table = compute_scores(config, train_data, backend=runner, comm=comm)
            if not writer:
                return
            if len(train_data.corrupted):
                table["corrupted"] = train_data.is_noisy
            run.write_scores(table)
            JobCheckpoints(run).clear()
            run.update_manifest(status="finished")
        finally:
            run.unlock()
    out_console.print(table.describe().T.to_string())
    out_console.print(f"wrote {run_dir / 'scores.parquet'}")


def prune(
    run: Path = typer.Option(..., "--run", help="run directory with scores.parquet"),
    by: str = typer.Option(..., "--by", help="score column (or random)"),
    keep: float = typer.Option(..., "--keep", help="fraction of examples to keep"),
    class_balanced: ClassBalanced = False,
    keep_hard: KeepHard = True,
    out: Path = typer.Option(Path("idx.npy"), "--out", help="where to write the kept example_ids (.npy)"),
    seed: int = typer.Option(0, help="tie-breaking seed"),
) -> None:
    """Select a subset of a scored run: write the kept example_ids (sorted) to a .npy file."""
    import numpy as np

    from ..actions import prune_run
    from ..rundir import atomic_path

    if not 0 <= keep <= 1:
        raise UsageError(f"--keep must be a fraction in [0, 1], got {keep}")
    ids = prune_run(run, by, keep, class_balanced=class_balanced, prefer="hard" if keep_hard else "easy", seed=seed)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, ids)
    out_console.print(f"kept {len(ids)} example_ids by {by} ({'hard' if keep_hard else 'easy'}); wrote {out}")
