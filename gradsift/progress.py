"""Progress bars (rich), silenced when asked or when not on a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress]:
    """A rich ``Progress``; every call is a no-op when ``enabled`` is false."""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    with bar:
        yield bar
