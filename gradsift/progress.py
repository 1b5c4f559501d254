"""Progress bars (rich), silenced when asked or when not on a terminal.

Two ways to show progress:

* :func:`progress_bar` gives a ``Progress`` to add tasks to (the training loop uses it);
* :func:`progress_scope` makes one display *current* for a block (the CLI opens one per
  command), and long library steps deep inside the block (many-model training, scoring)
  report to it through :func:`task`, which is a no-op when no display is current. Library
  functions therefore need no progress argument and stay silent when used from Python.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_CURRENT: ContextVar[Progress | None] = ContextVar("gradsift_progress", default=None)


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
            for t in set(enabled.task_ids) - before:
                enabled.remove_task(t)
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    with bar:
        yield bar


def current() -> Progress | None:
    """The display made current by :func:`progress_scope`, if any."""
    return _CURRENT.get()


@contextmanager
def progress_scope(enabled: bool) -> Iterator[Progress | None]:
    """Show the progress of every long step run inside this block (when ``enabled``)."""
    if not enabled:
        yield None
        return
    with progress_bar(True) as bar:
        token = _CURRENT.set(bar)
        try:
            yield bar
        finally:
            _CURRENT.reset(token)


@contextmanager
def task(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A task in the current display, removed when the block ends; yields
    ``advance(n=1)``. Without a current display it does nothing."""
    bar = current()
    if bar is None:
        yield lambda n=1: None
        return
    tid = bar.add_task(description, total=total)
    try:
        yield lambda n=1: bar.advance(tid, n)
    finally:
        bar.remove_task(tid)
