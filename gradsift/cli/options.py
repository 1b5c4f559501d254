"""Command-line options shared by several commands, each declared once.

A command takes one by annotating a parameter, with its own default where it differs::

    def scores(dataset: Dataset = "digits", seed: Seed = 0, quiet: Quiet = False): ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from .common import UsageError


def choice(*allowed: str) -> Callable[[str], str]:
    """An option callback accepting only ``allowed`` values (a usage error names them)."""

    def check(value: str) -> str:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"'{value}' is not one of: {', '.join(allowed)}")
        return value

    return check


NOISE_KINDS = ("none", "symmetric", "asymmetric", "random")

Dataset = Annotated[str, typer.Option(help="digits, mnist1d, a .npz/.csv/.parquet/.json file, an image folder or a HuggingFace save_to_disk directory")]
LabelColumn = Annotated[str, typer.Option("--label-column", help="CSV/Parquet: the label column (integers or class names)")]
Encoding = Annotated[str, typer.Option("--encoding", help="CSV: the text encoding of the file, e.g. latin-1")]
Seed = Annotated[int, typer.Option(help="random seed")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
LabelNoise = Annotated[str, typer.Option(callback=choice(*NOISE_KINDS),
                                         help="corrupt the training labels first: none, symmetric, asymmetric "
                                              "or random (all labels random)")]
NoiseRate = Annotated[Optional[float], typer.Option(min=0.0, max=1.0,
                                                    help="fraction of labels corrupted by --label-noise "
                                                         "symmetric/asymmetric")]
Epochs = Annotated[int, typer.Option(min=1, help="training epochs")]
Width = Annotated[int, typer.Option(min=1, help="MLP hidden width")]
MemModels = Annotated[int, typer.Option(min=2, help="models for memorization scores")]
KeepHard = Annotated[bool, typer.Option("--keep-hard/--keep-easy",
                                        help="keep the highest (hard) or lowest (easy) scores")]
ClassBalanced = Annotated[bool, typer.Option("--class-balanced", help="keep the fraction within every class")]
Backend = Annotated[str, typer.Option(callback=choice("local", "ray"),
                                      help="where the many-model parts run: local (this process) or ray (Ray tasks)")]
RayAddress = Annotated[Optional[str], typer.Option(
    help="Ray cluster to join (e.g. auto, ray://HOST:10001); default: a local ray.init()")]
RunDirOption = Annotated[Path, typer.Option("--run-dir", "--out", help="run directory")]
Resume = Annotated[bool, typer.Option("--resume", help="continue the run in the run directory from its checkpoint "
                                                       "(same options; only --epochs may grow)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="clear the run directory first if it holds a run")]
OutDir = Annotated[Path, typer.Option("--out", help="output directory")]


def noise_rate_for(label_noise: str, noise_rate: float | None, *, default: float | None = None) -> float:
    """The noise rate to use with ``--label-noise``; refuses a combination that would be
    ignored (a rate without symmetric/asymmetric noise, or such noise without a rate)."""
    if label_noise in ("none", "random"):
        if noise_rate is not None:
            what = "no --label-noise" if label_noise == "none" else "--label-noise random (every label is random)"
            raise UsageError(f"--noise-rate {noise_rate:g} has no effect with {what}; "
                             "add --label-noise symmetric or asymmetric, or drop --noise-rate")
        return 0.0
    if noise_rate is None:
        if default is None:
            raise UsageError(f"--label-noise {label_noise} needs --noise-rate (the fraction of labels to corrupt)")
        return default
    return noise_rate
