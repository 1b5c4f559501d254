"""Progress bars (rich), silenced when asked or when not on a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(enabled: bool | Progress) -> Iterator[Progress]:
    """A rich ``Progress``; every call is a no-op when ``enabled`` is false.

    ``enabled`` may also be a ``Progress`` that is already showing (an outer job such as
    the runs of an experiment): its tasks are then nested in that display, and the tasks
    added inside this block are removed when it ends, so one live display serves all.
    """
    if isinstance(enabled, Progress):
        before = set(enabled.task_ids)
        try:
            yield enabled
        finally:
            for task in set(enabled.task_ids) - before:
                enabled.remove_task(task)
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    with bar:
        yield bar
