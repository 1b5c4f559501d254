"""What every command shares: the consoles, ``error:`` messages, the wrapper that turns
user mistakes into ``error: ...`` and exit code 2, progress, and the many-model backend."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.text import Text

from ..errors import GradsiftError

console = Console(stderr=True)
out_console = Console()

# File-system mistakes (a path that is missing, a file where a directory belongs, ...).
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def error(message: str) -> None:
    """Print ``error: message`` to stderr (no markup in ``message``, no line wrapping)."""
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


class UsageError(GradsiftError, ValueError):
    """A combination of command-line options that cannot work (the message says which)."""


def user_errors(fn: Callable) -> Callable:
    """Turn gradsift's user-facing errors and file-system mistakes into ``error: ...`` and
    exit code 2 (no traceback); Ctrl-C into exit code 130."""

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


def show_progress(quiet: bool) -> bool:
    """Progress bars only on a terminal and without ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


@contextlib.contextmanager
def many_model_backend(name: str, address: str | None) -> Iterator[tuple]:
    """``(backend, comm)`` for a many-model command: Ray tasks, torchrun ranks (when started
    by torchrun; then ``comm`` is the process group) or this process."""
    from ..distributed import launched_by_torchrun
    from ..backends import RankBackend, backend_from_spec
    from ..ray_backend import RayBackend

    if launched_by_torchrun():
        if name == "ray":
            raise UsageError("choose one: torchrun or --backend ray")
        from ..distributed import init_from_env

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


def write_experiment_report(out: Path) -> Path:
    """Write ``out/report.html`` after an experiment command (see ``gradsift report``)."""
    from ..report import write_report

    return write_report(out)
