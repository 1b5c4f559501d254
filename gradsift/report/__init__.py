"""A self-contained HTML report of a run or experiment directory.

::

    from gradsift.report import write_report
    write_report("runs/memorization")             # -> runs/memorization/report.html

The page holds everything it shows (CSS inline, plots as base64 PNG data URIs) and refers
to no URL, so it opens offline and can be mailed as one file. What it shows depends on what
the directory holds: run configuration, accuracy and loss curves, m-coherence (whole model
and per layer), histograms of per-example scores, the top label issues with the examples
drawn, pruning curves, privacy spent; sections without data are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..rundir import atomic_path, is_run_dir
from .experiment import experiment_sections, is_experiment_dir
from .html import ReportError, page
from .run_sections import run_sections
from .sift import issues_section

__all__ = ["build_report", "write_report", "ReportError"]


def build_report(path: str | Path, *, top_issues: int = 12, dataset: str | None = None, seed: int = 0) -> str:
    """The report of ``path`` as an HTML string.

    Args:
        path: a run directory (``manifest.json``/``metrics.parquet``), an experiment
            directory (``summary.json``), or a label-issues CSV (``gradsift issues --out``).
        top_issues: how many label issues to draw.
        dataset, seed: for a label-issues CSV, the data set (and split seed) it ranks, so
            that the examples can be drawn.
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(
            f"no such directory: {path}. Give a run directory (from `gradsift train --run-dir`), "
            "an experiment directory (from `gradsift memorization --out`) or a label-issues CSV."
        )
    if top_issues < 0:
        raise ReportError(f"top_issues must be >= 0, got {top_issues}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ReportError(f"{path} is a file; give the directory that holds it ({path.parent}), "
                              "or a label-issues CSV written by `gradsift issues`.")
        sections = issues_file_sections(path, dataset=dataset, seed=seed, top=top_issues)
        title = f"gradsift label issues: {path.name}"
    elif is_experiment_dir(path):
        kind, sections = experiment_sections(path, top_issues=top_issues)
        title = f"gradsift {kind}: {path.resolve().name}"
    elif is_run_dir(path):
        sections = run_sections(path, top_issues=top_issues)
        title = f"gradsift run: {path.resolve().name}"
    else:
        raise ReportError(
            f"{path} holds neither summary.json (an experiment) nor manifest.json or metrics.parquet "
            "(a run). Point `gradsift report` at a directory written by gradsift."
        )
    if not sections:
        raise ReportError(f"{path} holds nothing to report yet (no metrics, scores or results)")
    return page(title, f"{path.resolve()}", sections)


def issues_file_sections(path: Path, *, dataset: str | None, seed: int = 0, top: int = 12) -> list:
    """Sections of a label-issues CSV (``example_id, score, given_label, suggested_label``)."""
    import pandas as pd

    try:
        issues = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not a readable CSV ({e})") from None
    if "example_id" not in issues:
        raise ReportError(f"{path} is not a label-issues table: it has no example_id column "
                          f"(columns: {', '.join(map(str, issues.columns))})")
    section = issues_section(issues, dataset=dataset, seed=seed, top=top)
    return [section] if section is not None else []


def default_out(path: str | Path) -> Path:
    """Where the report of ``path`` goes by default: ``DIR/report.html``, or the CSV's name
    with ``.html``."""
    path = Path(path)
    return path.with_suffix(".html") if path.is_file() else path / "report.html"


def write_report(path: str | Path, out: str | Path | None = None, *, top_issues: int = 12,
                 dataset: str | None = None, seed: int = 0) -> Path:
    """Write the report of ``path`` to ``out`` (default :func:`default_out`), atomically."""
    html_text = build_report(path, top_issues=top_issues, dataset=dataset, seed=seed)
    out = Path(out) if out is not None else default_out(path)
    with atomic_path(out) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable like any file written with open()
    return out
