"""The ``gradsift`` command line (typer)."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import GradsiftError, SpecError
from .progress import progress_scope

app = typer.Typer(
    name="gradsift",
    help="The per-example view of training: coherence, robust/private aggregation, data scores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()


def error(message: str) -> None:
    """Print ``error: message`` to stderr (no markup in ``message``, no line wrapping)."""
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


# File-system mistakes (a path that is missing, a file where a directory belongs, ...).
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_errors(fn: Callable) -> Callable:
    """Turn gradsift's user-facing errors and file-system mistakes into a message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GradsiftError as e:
            error(str(e))
            raise typer.Exit(code=2) from None
        except PATH_ERRORS as e:
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            what = e.strerror if getattr(e, "strerror", None) else str(e)
            error(f"{what}{where}. Check the path (and that directories are directories and files are files).")
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: finished epochs are saved in the run directory")
            raise typer.Exit(code=130) from None

    return wrapper


def choice(*allowed: str) -> Callable[[str], str]:
    """An option callback accepting only ``allowed`` values (a usage error names them)."""

    def check(value: str) -> str:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"'{value}' is not one of: {', '.join(allowed)}")
        return value

    return check


def show_progress(quiet: bool) -> bool:
    """Progress bars only on a terminal and without ``--quiet``."""
    return not quiet and sys.stderr.isatty()


# Options shared by the many-model commands (scores, pruning-curve).
BACKEND_OPTION = typer.Option("local", callback=choice("local", "ray"),
                              help="where the many-model parts run: local (this process) or ray (Ray tasks)")
RAY_ADDRESS_OPTION = typer.Option(None, help="Ray cluster to join (e.g. auto, ray://HOST:10001); default: a local ray.init()")


@app.command()
@user_errors
def memorization(
    dataset: str = typer.Option("digits", help="digits, mnist1d, or a .npz/.csv file"),
    out: Path = typer.Option(Path("runs/memorization"), "--out", help="output directory"),
    epochs: int = typer.Option(None, min=1, help="epochs per run (default: the experiment's)"),
    width: int = typer.Option(None, min=1, help="MLP hidden width"),
    lr: float = typer.Option(None, min=0.0, help="SGD learning rate"),
    momentum: float = typer.Option(None, min=0.0, help="SGD momentum"),
    batch_size: int = typer.Option(None, min=1, help="batch size"),
    winsorize_c: int = typer.Option(None, "--winsorize-c", min=0, help="c of winsorize (values clipped at each end)"),
    n_train: int = typer.Option(None, min=1, help="use only this many training examples"),
    seed: int = typer.Option(0, help="random seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train the same MLP on real and random labels with SGD (mean), winsorize and m3;
    write summary.json, a plot and a table of accuracy and m-coherence."""
    from .experiments.memorization import MemorizationConfig, run_memorization

    overrides = dict(epochs=epochs, width=width, lr=lr, momentum=momentum, batch_size=batch_size,
                     winsorize_c=winsorize_c, n_train=n_train)
    config = MemorizationConfig(dataset=dataset, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    summary = run_memorization(config, out, progress=show_progress(quiet))
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


def write_experiment_report(out: Path) -> Path:
    """Write ``out/report.html`` after an experiment command (see ``gradsift report``)."""
    from .report import write_report

    return write_report(out)


@app.command()
@user_errors
def report(
    path: Path = typer.Argument(..., help="a run directory (train --run-dir), an experiment directory (--out), "
                                          "or a label-issues CSV (issues --out)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: PATH/report.html, "
                                       "or the CSV's name with .html)"),
    top_issues: int = typer.Option(12, "--top-issues", min=0, help="how many label issues to draw"),
    dataset: Optional[str] = typer.Option(None, help="for a label-issues CSV: the data set it ranks (to draw examples)"),
    seed: int = typer.Option(0, help="for a label-issues CSV: the seed of the data split"),
) -> None:
    """Write a self-contained HTML report of a run or experiment directory: configuration,
    accuracy/loss and m-coherence curves, score histograms, label issues, pruning curves,
    privacy spent (whatever the directory holds). It needs no network to view."""
    from .report import write_report

    written = write_report(path, out, top_issues=top_issues, dataset=dataset, seed=seed)
    out_console.print(f"wrote {written}")


@app.command()
@user_errors
def train(
    dataset: str = typer.Option("digits", help="digits, mnist1d, or a .npz/.csv file"),
    model: str = typer.Option("mlp:width=256", help="mlp[:width=..,depth=..] or cnn[:channels=..]"),
    aggregator: str = typer.Option("mean", help="e.g. mean, winsorize:c=2, m3, rm3, trimmed_mean:fraction=0.1, clip:max_norm=1+mean, sven:rank=16"),
    optimizer: str = typer.Option("sgd:lr=0.1,momentum=0.9", help="NAME[:k=v,...] from torch.optim or pytorch_optimizer, e.g. adamw:lr=1e-3, lion:lr=1e-4"),
    epochs: int = typer.Option(10, min=1, help="number of epochs"),
    batch_size: int = typer.Option(100, min=1, help="batch size"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="epoch-wise torch.optim.lr_scheduler by spec, e.g. multisteplr:milestones=(30,),gamma=0.1 or cosine:T_max=50"),
    label_noise: str = typer.Option("none", callback=choice("none", "symmetric", "asymmetric", "random"), help="none, symmetric, asymmetric or random"),
    noise_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="fraction of labels corrupted (symmetric/asymmetric)"),
    coherence: bool = typer.Option(True, help="record m-coherence on a probe batch each epoch"),
    on_nonfinite: str = typer.Option("raise", callback=choice("raise", "drop"), help="raise or drop examples with NaN/inf gradients"),
    run_dir: Path = typer.Option(Path("runs/train"), "--run-dir", "--out", help="run directory"),
    resume: bool = typer.Option(False, help="continue from the run directory's last checkpoint"),
    seed: int = typer.Option(0, help="random seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    dist_mode: str = typer.Option("exact", help="under torchrun: exact (same update as one process on the global batch) or local (each rank aggregates its slice, then mean)"),
    dist_backend: str = typer.Option("auto", help="under torchrun: gloo, nccl or auto (nccl when CUDA is available)"),
    dist_timeout: float = typer.Option(300.0, help="under torchrun: seconds a rank waits for the others before failing"),
    dp: bool = typer.Option(False, "--dp", help="train with DP-SGD (per-example clipping, Gaussian noise, Poisson sampling)"),
    target_epsilon: Optional[float] = typer.Option(None, "--target-epsilon", help="DP: plan the noise multiplier for this epsilon"),
    noise_multiplier: Optional[float] = typer.Option(None, "--noise-multiplier", help="DP: sigma (instead of --target-epsilon)"),
    delta: float = typer.Option(1e-5, "--delta", help="DP: delta (must be below 1/N)"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="DP: per-example clipping bound C"),
    per_layer_clip: bool = typer.Option(False, "--per-layer-clip", help="DP: clip each layer to C/sqrt(layers)"),
    sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="DP: Poisson sampling rate q (default batch_size/N)"),
    accountant: str = typer.Option("rdp", "--accountant", callback=choice("rdp", "prv"), help="DP: rdp or prv (Opacus)"),
) -> None:
    """Train a model with any aggregator and optimizer; write a run directory.

    Started by torchrun (e.g. ``torchrun --nproc-per-node 2 -m gradsift train ...``) it
    trains data-parallel: --batch-size is the global batch, rank 0 writes the run directory."""
    import torch

    from . import data as data_mod
    from .aggregate import aggregator_from_spec
    from .models import model_from_spec
    from .recorders import CoherenceRecorder
    from .train import fit

    agg = aggregator_from_spec(aggregator)  # fail fast on a bad spec, before loading data
    if dist_mode not in ("exact", "local"):
        raise SpecError(f"--dist-mode must be exact or local, got '{dist_mode}'")
    privacy = None
    if dp:
        from .privacy import DPSGD

        if target_epsilon is None and noise_multiplier is None:
            raise typer.BadParameter("--dp needs --target-epsilon or --noise-multiplier")
        privacy = DPSGD(delta=delta, max_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                        target_epsilon=target_epsilon, sample_rate=sample_rate,
                        per_layer=per_layer_clip, accountant=accountant)
    elif target_epsilon is not None or noise_multiplier is not None:
        raise typer.BadParameter("--target-epsilon / --noise-multiplier need --dp")
    train_data, test_data = data_mod.load(dataset, seed=seed)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    torch.manual_seed(seed)
    net = model_from_spec(model, train_data.shape or train_data.x.shape[1:], train_data.num_classes)
    config = dict(dataset=dataset, model=model, aggregator_spec=aggregator, optimizer_spec=optimizer,
                  label_noise=label_noise, noise_rate=noise_rate, corrupted=len(train_data.corrupted))
    kwargs = dict(
        aggregator=agg, optimizer=optimizer, epochs=epochs, batch_size=batch_size, seed=seed,
        run_dir=run_dir, resume=resume, recorders=[CoherenceRecorder(seed=seed)] if coherence else [],
        on_nonfinite=on_nonfinite, progress=show_progress(quiet), config=config, privacy=privacy,
        lr_schedule=lr_schedule,
    )
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        from .distributed import fit_distributed, init_from_env

        comm = init_from_env(dist_backend, dist_timeout)
        try:
            result = fit_distributed(net, train_data, test_data, comm=comm, mode=dist_mode, **kwargs)
        finally:
            comm.close()
        if comm.rank != 0:
            return
    else:
        result = fit(net, train_data, test_data, **kwargs)
    last = result.history.iloc[-1].to_dict()
    out_console.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()}))
    if privacy is not None:
        rep = result.trainer.privacy_report
        out_console.print(
            f"privacy: epsilon spent {rep['epsilon']:.3f} at delta {rep['delta']:g} "
            f"(sigma {rep['noise_multiplier']:.4g}, C {rep['max_norm']:g}, q {rep['sample_rate']:.4g}, "
            f"{rep['steps']} steps, {rep['accountant']} accountant)"
        )
    out_console.print(f"wrote {run_dir}")


@app.command()
@user_errors
def issues(
    dataset: str = typer.Option("digits", help="digits, mnist1d, or a .npz/.csv file"),
    label_noise: str = typer.Option("none", callback=choice("none", "symmetric", "asymmetric", "random"),
                                    help="inject noise first: none, symmetric, asymmetric"),
    noise_rate: float = typer.Option(0.2, min=0.0, max=1.0, help="fraction of labels corrupted when --label-noise is set"),
    method: str = typer.Option("combined", help="combined, oof_loss, oof_margin, cum_loss or learning_time"),
    folds: int = typer.Option(5, min=2, help="cross-validation folds"),
    epochs: int = typer.Option(20, min=1, help="epochs per fold model"),
    width: int = typer.Option(128, min=1, help="MLP hidden width"),
    num_issues: int = typer.Option(None, min=0, help="how many to flag (default: confident-learning count)"),
    out: Path = typer.Option(Path("issues.csv"), "--out", help="CSV: example_id, score, given_label, suggested_label "
                             "(and an HTML report beside it, same name with .html)"),
    seed: int = typer.Option(0, help="random seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Rank likely label issues and write the flagged ones to a CSV, most suspect first.

    Uses a cross-validated small model: out-of-fold loss/margin and training dynamics."""
    import numpy as np

    from . import data as data_mod
    from .label_issues import METHODS, find_label_issues
    from .store import atomic_path

    if method not in METHODS:
        raise GradsiftError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    train_data, _ = data_mod.load(dataset, seed=seed)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    with progress_scope(show_progress(quiet)):
        order, details = find_label_issues(train_data.x, train_data.y, num_classes=train_data.num_classes,
                                           method=method, folds=folds, epochs=epochs, width=width,
                                           num_issues=num_issues, seed=seed, return_details=True)
    table = details.iloc[order].copy()
    table.insert(0, "example_id", train_data.example_ids[order])
    table = table.drop(columns=["is_issue"])
    if len(train_data.corrupted):
        table["corrupted"] = train_data.is_noisy[order]
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    from .report import write_report

    report = write_report(out, dataset=dataset, seed=seed)
    msg = f"flagged {len(order)} of {len(train_data)} examples; wrote {out} and {report}"
    if len(train_data.corrupted):
        from sklearn.metrics import roc_auc_score

        truth = train_data.is_noisy
        msg += (f"\n  injected {int(truth.sum())} label errors: precision {truth[order].mean():.3f}, "
                f"recall {truth[order].sum() / truth.sum():.3f}, AUROC {roc_auc_score(truth, details.score):.3f}")
    out_console.print(msg)


@app.command()
@user_errors
def scores(
    dataset: str = typer.Option("digits", help="digits, mnist1d, or a .npz/.csv file"),
    run_dir: Path = typer.Option(Path("runs/scores"), "--run-dir", "--out", help="run directory to write"),
    scores: str = typer.Option("el2n,grand,forgetting,memorization",
                               help="comma list of el2n, grand, memorization, forgetting, loss, cum_loss, learning_time, margin"),
    label_noise: str = typer.Option("none", callback=choice("none", "symmetric", "asymmetric", "random"),
                                    help="none, symmetric, asymmetric or random"),
    noise_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="fraction of labels corrupted"),
    epochs: int = typer.Option(15, min=1, help="training epochs (dynamics, memorization models)"),
    width: int = typer.Option(128, min=1, help="MLP hidden width"),
    mem_models: int = typer.Option(16, min=2, help="models for memorization scores"),
    seed: int = typer.Option(0, help="random seed"),
    backend: str = BACKEND_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Score every training example; write RUN/scores.parquet (one row per example_id).

    With --backend ray the models behind el2n/grand and memorization are Ray tasks. Started
    by torchrun, the ranks share those models and train the dynamics run data-parallel;
    rank 0 writes. The table is the same either way."""
    from . import data as data_mod
    from .experiments.pruning_curve import PruningCurveConfig, compute_scores
    from .store import RunDir

    config = PruningCurveConfig(dataset=dataset, scores=tuple(_split_list(scores)), epochs=epochs, width=width,
                                mem_models=mem_models, seed=seed)
    train_data, _ = data_mod.load(dataset, seed=seed)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    with many_model_backend(backend, ray_address) as (runner, comm), \
            progress_scope(show_progress(quiet) and (comm is None or comm.rank == 0)):
        table = compute_scores(config, train_data, backend=runner, comm=comm)
    if comm is not None and comm.rank != 0:
        return
    if len(train_data.corrupted):
        table["corrupted"] = train_data.is_noisy
    run = RunDir(run_dir)
    run.write_manifest({"command": "scores", "dataset": dataset, "scores": list(config.scores),
                        "label_noise": label_noise, "noise_rate": noise_rate, "epochs": epochs}, seed=seed)
    run.write_scores(table)
    out_console.print(table.describe().T.to_string())
    out_console.print(f"wrote {run_dir / 'scores.parquet'}")


@contextlib.contextmanager
def many_model_backend(name: str, address: str | None):
    """``(backend, comm)`` for a many-model command: Ray tasks, torchrun ranks (when started
    by torchrun; then ``comm`` is the process group) or this process."""
    from .distributed import launched_by_torchrun
    from .distributed.backends import RankBackend, RayBackend, backend_from_spec

    if launched_by_torchrun():
        if name == "ray":
            raise GradsiftError("choose one: torchrun or --backend ray")
        from .distributed import init_from_env

        comm = init_from_env()
        try:
            yield RankBackend(comm), comm
        finally:
            comm.close()
        return
    runner = backend_from_spec(name, address=address)
    try:
        yield runner, None
    finally:
        if isinstance(runner, RayBackend):
            runner.close()


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command()
@user_errors
def prune(
    run: Path = typer.Option(..., "--run", help="run directory with scores.parquet"),
    by: str = typer.Option(..., "--by", help="score column (or random)"),
    keep: float = typer.Option(..., "--keep", help="fraction of examples to keep"),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="keep the fraction within every class"),
    keep_hard: bool = typer.Option(True, "--keep-hard/--keep-easy", help="keep the highest (hard) or lowest (easy) scores"),
    out: Path = typer.Option(Path("idx.npy"), "--out", help="where to write the kept example_ids (.npy)"),
    seed: int = typer.Option(0, help="tie-breaking seed"),
) -> None:
    """Select a subset of a scored run: write the kept example_ids (sorted) to a .npy file."""
    import numpy as np

    from .actions import prune_run
    from .store import atomic_path

    if not 0 <= keep <= 1:
        raise GradsiftError(f"--keep must be a fraction in [0, 1], got {keep}")
    ids = prune_run(run, by, keep, class_balanced=class_balanced, prefer="hard" if keep_hard else "easy", seed=seed)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, ids)
    out_console.print(f"kept {len(ids)} example_ids by {by} ({'hard' if keep_hard else 'easy'}); wrote {out}")


@app.command("pruning-curve")
@user_errors
def pruning_curve(
    dataset: str = typer.Option("mnist1d", help="digits, mnist1d, or a .npz/.csv file"),
    scores: str = typer.Option("el2n,grand,forgetting,memorization,random", help="comma list of scores"),
    fractions: str = typer.Option("0.3,0.5,0.7,1.0", help="comma list of fractions kept"),
    seeds: int = typer.Option(2, min=1, help="training seeds per point"),
    epochs: int = typer.Option(15, min=1, help="epochs per model"),
    width: int = typer.Option(128, min=1, help="MLP hidden width"),
    mem_models: int = typer.Option(16, min=2, help="models for memorization scores"),
    keep_hard: bool = typer.Option(True, "--keep-hard/--keep-easy", help="keep the hardest or the easiest"),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="keep the fraction within every class"),
    out: Path = typer.Option(Path("runs/pruning"), "--out", help="output directory"),
    seed: int = typer.Option(0, help="random seed"),
    backend: str = BACKEND_OPTION,
    ray_address: Optional[str] = RAY_ADDRESS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Accuracy vs fraction of data kept, per score: write summary.json and a plot.

    Scores the training set, keeps fractions of it by each score, retrains with several
    seeds; summary.json maps score -> fraction -> test accuracy mean/std over seeds."""
    from .experiments.pruning_curve import PruningCurveConfig, run_pruning_curve

    try:
        fr = tuple(float(f) for f in _split_list(fractions))
    except ValueError:
        raise GradsiftError(f"--fractions must be a comma list of numbers, got '{fractions}'") from None
    config = PruningCurveConfig(dataset=dataset, scores=tuple(_split_list(scores)), fractions=fr, seeds=seeds,
                                epochs=epochs, width=width, mem_models=mem_models,
                                prefer="hard" if keep_hard else "easy", class_balanced=class_balanced, seed=seed)
    from .distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise GradsiftError("pruning-curve does not run under torchrun; use --backend ray to spread its models")
    with many_model_backend(backend, ray_address) as (runner, _), progress_scope(show_progress(quiet)):
        summary = run_pruning_curve(config, out, backend=runner)
    table = Table(title=f"pruning curve on {dataset}: test accuracy (mean ± std over {seeds} seeds)")
    table.add_column("score")
    for f in sorted(fr):
        table.add_column(f"keep {f:g}", justify="right")
    for name, by_frac in summary["results"].items():
        table.add_row(name, *[f"{by_frac[str(f)]['test_acc_mean']:.3f} ± {by_frac[str(f)]['test_acc_std']:.3f}"
                              for f in sorted(fr)])
    out_console.print(table)
    report = write_experiment_report(out)
    out_console.print(f"wrote {out / 'summary.json'}, {out / 'pruning_curve.png'} and {report}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
