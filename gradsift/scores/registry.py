"""The score registry: every per-example score registers itself once, in its own file.

A score entry says what the score is and how to get it; the CLI (``gradsift scores``
help), :func:`compute_scores`, pruning curves and reports read the registry, so a new
score is one new file that calls :func:`register_score`::

    from gradsift.scores import register_score

    class MyRecorder(gs.Recorder):           # observes fit(); scores() -> DataFrame
        ...

    register_score("my_score", kind="recorder", make=lambda settings: MyRecorder(),
                   columns=("my_score",), higher_is_harder=True,
                   description="what it measures")

Kinds:

* ``recorder``: ``make(settings) -> Recorder`` whose ``scores()`` returns a DataFrame
  indexed by ``example_id`` holding ``columns``; :func:`compute_scores` trains one model
  with :func:`gradsift.fit` and every wanted recorder attached (one recorder per distinct
  ``make``, shared by the scores that use it).
* ``function``: ``make(data, settings, wanted, backend) -> DataFrame`` indexed by
  ``example_id`` holding the ``columns`` of the ``wanted`` names; one call per distinct
  ``make`` (e.g. ``el2n`` and ``grand`` share the Data Diet models).

Orientation: ``higher_is_harder=True`` means a high value marks a hard, atypical or
suspect example (loss, EL2N, forgetting); ``False`` means the opposite (margin, AUM).
:func:`hardness` turns any registered column into a higher-is-harder array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import GradsiftError

__all__ = ["Score", "ScoreSettings", "SCORES", "register_score", "score_names", "score_for_column",
           "hardness", "compute_scores"]


@dataclass
class ScoreSettings:
    """The training settings score computations share (the defaults finish in minutes on
    2 CPU cores for MNIST-1D): the MLP ``width``, SGD ``epochs``/``batch_size``/``lr``/
    ``momentum``/``weight_decay``, Data Diet ``diet_inits``/``diet_epochs``, memorization
    ``mem_models``/``mem_fraction``, and ``seed``."""

    width: int = 128
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    diet_inits: int = 4
    diet_epochs: int = 2
    mem_models: int = 16
    mem_fraction: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class Score:
    """A registered score.

    Attributes:
        name: the score's name (``--scores`` in the CLI, ``--by`` in ``gradsift prune``).
        kind: ``"recorder"`` or ``"function"`` (see the module docs).
        columns: the ``scores.parquet`` columns it writes; ``columns[0]`` is the score.
        higher_is_harder: whether a high value means hard / atypical / suspect.
        make: the recorder factory or the function (see the module docs).
        description: one line for help texts and reports.
    """

    name: str
    kind: Literal["recorder", "function"]
    columns: tuple[str, ...]
    higher_is_harder: bool
    make: Callable[..., Any] = field(repr=False, compare=False)
    description: str = ""

    @property
    def column(self) -> str:
        """The column holding the score itself."""
        return self.columns[0]


class ScoreRegistry(Mapping[str, Score]):
    """Name -> :class:`Score`, in registration order; unknown names raise with the known ones."""

    def __init__(self) -> None:
        self._entries: dict[str, Score] = {}

    def add(self, entry: Score) -> None:
        if entry.name in self._entries and self._entries[entry.name] != entry:
            raise GradsiftError(f"score '{entry.name}' is already registered")
        self._entries[entry.name] = entry

    def __getitem__(self, name: str) -> Score:
        try:
            return self._entries[name]
        except KeyError:
            raise GradsiftError(f"unknown score '{name}'. Known: {', '.join(self._entries)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, kind: str | None = None) -> list[str]:
        """Registered names (of one ``kind`` if given)."""
        return [n for n, e in self._entries.items() if kind is None or e.kind == kind]


#: every registered score (import :mod:`gradsift.scores` to fill it)
SCORES = ScoreRegistry()


def register_score(name: str, *, kind: Literal["recorder", "function"], make: Callable[..., Any],
                   columns: Sequence[str] | None = None, higher_is_harder: bool = True,
                   description: str = "") -> Score:
    """Register a score (see the module docs); returns the entry.

    Args:
        name: unique name.
        kind: ``"recorder"`` (``make(settings) -> Recorder``) or ``"function"``
            (``make(data, settings, wanted, backend) -> DataFrame``).
        columns: the columns it writes (default ``(name,)``); the first is the score.
        higher_is_harder: orientation (see the module docs).
        description: one line for help texts.
    """
    if kind not in ("recorder", "function"):
        raise GradsiftError(f"score kind must be 'recorder' or 'function', got '{kind}'")
    entry = Score(name, kind, tuple(columns or (name,)), bool(higher_is_harder), make, description)
    SCORES.add(entry)
    return entry


def score_names(kind: str | None = None) -> list[str]:
    """Names of the registered scores (of one ``kind`` if given), for help texts."""
    return SCORES.names(kind)


def score_for_column(column: str) -> Score | None:
    """The registered score writing ``column`` (``None`` if none does)."""
    for entry in SCORES.values():
        if column in entry.columns:
            return entry
    return None


def hardness(table: pd.DataFrame, name: str) -> np.ndarray:
    """``[N]`` float values of score ``name`` from ``table`` (``scores.parquet``), oriented
    so that higher is harder (negated when the score's ``higher_is_harder`` is False)."""
    entry = SCORES[name]
    if entry.column not in table.columns:
        raise GradsiftError(f"the table has no column '{entry.column}' for score '{name}' "
                            f"(it has: {', '.join(map(str, table.columns))})")
    v = table[entry.column].to_numpy(dtype=np.float64)
    return v if entry.higher_is_harder else -v


def _resumable_run() -> dict:
    """Inside :func:`gradsift.rundir.checkpointing`: the recorders' training run checkpoints
    every epoch in a run directory of its own under ``RUN/checkpoints/`` and continues
    from it (recorder state included)."""
    from ..rundir import active_checkpoints

    jobs = active_checkpoints()
    if jobs is None:
        return {}
    run_dir = jobs.subdir(jobs.next_key("fit"))
    resume = (run_dir / "checkpoint.pt").exists()
    return {"run_dir": run_dir, "resume": resume, "overwrite": not resume}


def compute_scores(data, settings: ScoreSettings, names: Sequence[str], *, backend=None, comm=None,
                   progress: Any = None) -> pd.DataFrame:
    """Score every example of ``data`` (a :class:`gradsift.data.Dataset`) with the
    registered scores ``names``.

    Recorder scores share one :func:`gradsift.fit` run of the MLP ``mlp_factory(data,
    width, seed=settings.seed + 1000)(0)`` with SGD (``comm``: data-parallel under
    torchrun); function scores are called once per distinct function, with ``backend``
    for their many-model parts. The table does not depend on ``backend`` or ``comm``.

    ``progress``: ``None`` shows the training epochs in the caller's progress display, if any.

    Inside :func:`gradsift.rundir.checkpointing` every training checkpoints per epoch (or
    per model) and continues from its checkpoint: a killed job, run again in the block,
    gives the same table.

    Returns:
        DataFrame indexed by ``example_id``: ``label`` and every requested score's columns,
        in the order of ``names``.
    """
    from ..ensemble import mlp_factory
    from ..progress import current

    entries = [SCORES[n] for n in names]  # raises with the known names
    frames = [pd.DataFrame({"label": data.y}, index=pd.Index(data.example_ids, name="example_id"))]
    groups: dict[Any, list[Score]] = {}
    for e in entries:
        groups.setdefault((e.kind, e.make), []).append(e)
    for (kind, make), group in groups.items():
        if kind == "function":
            got = make(data, settings, tuple(e.name for e in group), backend)
            frames.append(got[[c for e in group for c in e.columns]])
    recorders = [(make(settings), group) for (kind, make), group in groups.items() if kind == "recorder"]
    if recorders:
        from ..train import fit

        if comm is not None:
            from ..distributed import fit_distributed

            fit = partial(fit_distributed, comm=comm)  # noqa: F811
        model = mlp_factory(data, width=settings.width, seed=settings.seed + 1000)(0)
        fit(model, data, optimizer=f"sgd:lr={settings.lr},momentum={settings.momentum},"
                                   f"weight_decay={settings.weight_decay}",
            epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed,
            recorders=[r for r, _ in recorders],
            progress=(current() or False) if progress is None else progress,  # epochs in the caller's display
            **(_resumable_run() if comm is None else {}))
        for rec, group in recorders:
            table = rec.scores()
            frames.append(table[[c for e in group for c in e.columns]])
    out = pd.concat(frames, axis=1)
    order = ["label"] + [c for e in entries for c in e.columns]
    return out.loc[:, ~out.columns.duplicated()][list(dict.fromkeys(order))]
