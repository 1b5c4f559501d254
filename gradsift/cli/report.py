"""``gradsift report``: the HTML report of a run, an experiment or a label-issues CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import out_console


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
    from ..report import write_report

    written = write_report(path, out, top_issues=top_issues, dataset=dataset, seed=seed)
    out_console.print(f"wrote {written}")
