"""The ``gradsift`` command line (typer): one module per command group, registered below.

Adding a command is one new module here and one line in :data:`COMMANDS`. A module
exposes a plain function (its parameters are the options; shared ones come from
:mod:`gradsift.cli.options`) or a ``typer.Typer`` (a group of subcommands). Every command
runs inside :func:`~gradsift.cli.common.user_errors`, so gradsift's errors print as
``error: ...`` with exit code 2. Computation lives in the library; commands parse,
call and print.
"""

from __future__ import annotations

import importlib

import typer

from .common import error, show_progress, user_errors

__all__ = ["app", "main", "COMMANDS", "error", "show_progress", "user_errors"]

# command name -> "module:attribute" in this package
COMMANDS = {
    "train": "train:train",
    "scores": "scores:scores",
    "prune": "scores:prune",
    "issues": "issues:issues",
    "audit": "audit:audit",
    "validate-scores": "validate:validate_scores",
    "report": "report:report",
    "memorization": "experiments:memorization",
    "pruning-curve": "experiments:pruning_curve",
}

app = typer.Typer(
    name="gradsift",
    help="The per-example view of training: coherence, robust/private aggregation, data scores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def register(name: str, target: str) -> None:
    """Add the command ``name`` from ``"module:attribute"`` (a function or a ``typer.Typer``)."""
    module, attr = target.split(":")
    obj = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    if isinstance(obj, typer.Typer):
        for info in obj.registered_commands:
            info.callback = user_errors(info.callback)
        app.add_typer(obj, name=name)
    else:
        app.command(name)(user_errors(obj))


for _name, _target in COMMANDS.items():
    register(_name, _target)


def main() -> None:
    app()
