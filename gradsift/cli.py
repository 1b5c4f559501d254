"""The ``gradsift`` command line (typer)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import GradsiftError

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
    path: Path = typer.Argument(..., help="a run directory (train --run-dir) or an experiment directory (--out)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: PATH/report.html)"),
    top_issues: int = typer.Option(12, "--top-issues", min=0, help="how many label issues to draw"),
) -> None:
    """Write a self-contained HTML report of a run or experiment directory: configuration,
    accuracy/loss and m-coherence curves, score histograms, label issues, pruning curves,
    privacy spent (whatever the directory holds). It needs no network to view."""
    from .report import write_report

    written = write_report(path, out, top_issues=top_issues)
    out_console.print(f"wrote {written}")


@app.command()
@user_errors
def train(
    dataset: str = typer.Option("digits", help="digits, mnist1d, or a .npz/.csv file"),
    model: str = typer.Option("mlp:width=256", help="mlp[:width=..,depth=..] or cnn[:channels=..]"),
    aggregator: str = typer.Option("mean", help="e.g. mean, winsorize:c=2, m3, rm3, trimmed_mean:fraction=0.1, clip:max_norm=1+mean"),
    optimizer: str = typer.Option("sgd:lr=0.1,momentum=0.9", help="NAME[:k=v,...], e.g. adamw:lr=1e-3"),
    epochs: int = typer.Option(10, min=1, help="number of epochs"),
    batch_size: int = typer.Option(100, min=1, help="batch size"),
    label_noise: str = typer.Option("none", callback=choice("none", "symmetric", "asymmetric", "random"), help="none, symmetric, asymmetric or random"),
    noise_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="fraction of labels corrupted (symmetric/asymmetric)"),
    coherence: bool = typer.Option(True, help="record m-coherence on a probe batch each epoch"),
    on_nonfinite: str = typer.Option("raise", callback=choice("raise", "drop"), help="raise or drop examples with NaN/inf gradients"),
    run_dir: Path = typer.Option(Path("runs/train"), "--run-dir", "--out", help="run directory"),
    resume: bool = typer.Option(False, help="continue from the run directory's last checkpoint"),
    seed: int = typer.Option(0, help="random seed"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train a model with any aggregator and optimizer; write a run directory."""
    import torch

    from . import data as data_mod
    from .models import model_from_spec
    from .recorders import CoherenceRecorder
    from .specs import aggregator_from_spec
    from .train import fit

    agg = aggregator_from_spec(aggregator)  # fail fast on a bad spec, before loading data
    train_data, test_data = data_mod.load(dataset, seed=seed)
    train_data = data_mod.corrupt(train_data, label_noise, noise_rate, seed=seed)
    torch.manual_seed(seed)
    net = model_from_spec(model, train_data.shape or train_data.x.shape[1:], train_data.num_classes)
    config = dict(dataset=dataset, model=model, aggregator_spec=aggregator, optimizer_spec=optimizer,
                  label_noise=label_noise, noise_rate=noise_rate, corrupted=len(train_data.corrupted))
    result = fit(
        net, train_data, test_data, aggregator=agg, optimizer=optimizer, epochs=epochs,
        batch_size=batch_size, seed=seed, run_dir=run_dir, resume=resume,
        recorders=[CoherenceRecorder(seed=seed)] if coherence else [], on_nonfinite=on_nonfinite,
        progress=show_progress(quiet), config=config,
    )
    last = result.history.iloc[-1].to_dict()
    out_console.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()}))
    out_console.print(f"wrote {run_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
