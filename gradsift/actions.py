"""Act on per-example scores: select (prune) a subset, reweight, sample by weight.

    keep = gs.select(scores, 0.7, labels=y, class_balanced=True)        # positions kept
    w = gs.reweight(scores)                                              # [N] weights, mean 1
    gs.fit(model, train, sampler=gs.actions.weighted_sampler(w, 100))    # train by weight

Scores follow gradsift's convention: higher = harder (more atypical, more suspect).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .sampling import weighted_sampler  # noqa: F401  (re-exported: gs.actions.weighted_sampler)

KEEP = ("hard", "easy", "random")


def _count(n: int, fraction: float) -> int:
    return int(round(fraction * n))


def select(
    scores: np.ndarray | pd.Series,
    keep: float,
    *,
    labels: np.ndarray | None = None,
    class_balanced: bool = False,
    prefer: str = "hard",
    seed: int = 0,
) -> np.ndarray:
    """Positions of the examples to keep, sorted ascending.

    Args:
        scores: ``[N]`` (examples with a NaN score are kept last, whatever ``prefer``).
        keep: fraction in ``[0, 1]``; exactly ``round(keep * N)`` are kept, or with
            ``class_balanced`` exactly ``round(keep * N_c)`` of each class ``c``.
        labels: ``[N]``, needed for ``class_balanced``.
        prefer: ``hard`` keeps the highest scores (Data Diet), ``easy`` the lowest
            (better when data is scarce, "Beyond neural scaling laws"), ``random`` ignores
            the scores.
        seed: ties are broken, and ``random`` draws, with this seed.

    Returns:
        ``[round(keep * N)]`` int64 positions.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not 0 <= keep <= 1:
        raise ValueError(f"keep must be a fraction in [0, 1], got {keep}")
    if prefer not in KEEP:
        raise ValueError(f"prefer must be one of {', '.join(KEEP)}, got '{prefer}'")
    rng = np.random.default_rng(seed)
    if prefer == "random":
        key = rng.permutation(len(s)).astype(np.float64)
    else:
        filled = np.where(np.isnan(s), -np.inf, s)
        key = filled if prefer == "hard" else -np.where(np.isnan(s), np.inf, s)
    tiebreak = rng.permutation(len(s))
    if class_balanced:
        if labels is None:
            raise ValueError("class_balanced selection needs labels")
        labels = np.asarray(labels)
        if len(labels) != len(s):
            raise ValueError(f"labels has {len(labels)} entries, scores {len(s)}")
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    else:
        groups = [np.arange(len(s))]
    kept = []
    for g in groups:
        order = g[np.lexsort((tiebreak[g], -key[g]))]  # highest key first
        kept.append(order[: _count(len(g), keep)])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def reweight(scores: np.ndarray | pd.Series, *, prefer: str = "hard", strength: float = 1.0,
             floor: float = 0.0) -> np.ndarray:
    """Per-example weights from a score, by rank: ``w_i ∝ floor + (rank_i)^strength``
    where ``rank_i`` in ``[0, 1]`` is the example's rank (1 = hardest for ``prefer="hard"``,
    easiest for ``"easy"``), normalized to mean 1. ``strength=0`` gives uniform weights.

    Returns:
        ``[N]`` float64 weights with mean 1 (NaN scores get the lowest rank).
    """
    if prefer not in ("hard", "easy"):
        raise ValueError(f"prefer must be 'hard' or 'easy', got '{prefer}'")
    s = pd.Series(np.asarray(scores, dtype=np.float64))
    s = s.fillna(-np.inf if prefer == "hard" else np.inf)
    r = (s.rank(method="average") - 1).to_numpy() / max(len(s) - 1, 1)
    if prefer == "easy":
        r = 1 - r
    w = floor + r ** strength
    if w.sum() <= 0:
        raise ValueError("all weights are zero; raise floor")
    return w / w.mean()


def prune_run(run, by: str, keep: float, *, class_balanced: bool = False, prefer: str = "hard",
              seed: int = 0) -> np.ndarray:
    """Select from a run directory's ``scores.parquet``: returns the kept ``example_id`` s.

    Args:
        run: a path or :class:`gradsift.rundir.RunDir`.
        by: a score column (see :mod:`gradsift.scores`); ``random`` needs none.
        keep, class_balanced, prefer, seed: as :func:`select` (class-balanced uses the
            ``label`` column).
    """
    from .errors import GradsiftError
    from .rundir import Run, open_run

    r = run if isinstance(run, Run) else open_run(run)
    table = r.scores()
    if by == "random":
        prefer, values = "random", np.zeros(len(table))
    elif by not in table.columns:
        raise GradsiftError(f"run {r.path} has no score '{by}' (it has: {', '.join(table.columns)})")
    else:
        values = table[by].to_numpy()
    labels = None
    if class_balanced:
        if "label" not in table.columns:
            raise GradsiftError(f"run {r.path} has no 'label' column for a class-balanced selection")
        labels = table["label"].to_numpy()
    pos = select(values, keep, labels=labels, class_balanced=class_balanced, prefer=prefer, seed=seed)
    return table.index.to_numpy()[pos]
