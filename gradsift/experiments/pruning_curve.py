"""Pruning curves: test accuracy against the fraction of training data kept, per score.

For each score (any registered score, :data:`gradsift.scores.SCORES`, e.g. ``el2n``,
``grand``, ``forgetting``, ``memorization``, ``aum``; and ``random``), the training set is
scored once, then for each fraction the hardest examples are kept (``prefer="hard"``, as in
Data Diet; ``--keep-easy`` for the other end; "hardest" follows the score's registered
orientation, so low-margin/low-AUM examples count as hard) and fresh models are trained on
the subset with several seeds. All models of one fraction have the same subset size, so they train at once with
``torch.func`` (:func:`gradsift.ensemble.train_members`).

Outputs in ``OUT``:

* ``summary.json``::

      {"config": {...},
       "results": {score: {fraction (str): {"test_acc_mean": float, "test_acc_std": float,
                                              "test_acc": [per seed], "n_kept": int}}},
       "findings": {"best_score_at": {fraction: score}, ...}}

* ``scores.parquet``: the scores used (one row per ``example_id``; the directory is a run
  directory, so ``gradsift prune --run OUT`` and ``gradsift.open_run(OUT)`` work on it);
* ``pruning_curve.png``: accuracy vs fraction kept, one line per score (mean ± std).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod
from ..actions import select
from ..errors import GradsiftError
from ..ensemble import mlp_factory, predict_members, train_members
from ..progress import task
from ..rundir import RunDir, write_json
from ..scores import ScoreSettings, hardness, score_names
from ..scores import compute_scores as score_table

def known() -> list[str]:
    """Scores a pruning curve can use: every registered score and ``random``."""
    return score_names() + ["random"]


@dataclass
class PruningCurveConfig(ScoreSettings):
    """Settings (defaults finish in minutes on 2 CPU cores for MNIST-1D); the scoring
    settings are those of :class:`gradsift.scores.ScoreSettings`."""

    dataset: str = "mnist1d"
    scores: tuple[str, ...] = ("el2n", "grand", "forgetting", "memorization", "random")
    fractions: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    seeds: int = 2
    prefer: str = "hard"
    class_balanced: bool = False
    label_noise: str = "none"
    noise_rate: float = 0.0


def compute_scores(config: PruningCurveConfig, train: data_mod.Dataset, progress=None, *,
                   backend=None, comm=None) -> pd.DataFrame:
    """Score ``train`` with every score in ``config.scores`` (registered names; ``random``
    needs none): DataFrame indexed by example_id (see :func:`gradsift.scores.compute_scores`).

    ``backend`` trains the many-model scores (Data Diet inits, memorization subsets) in
    parallel tasks (:mod:`gradsift.backends`); ``comm`` (under torchrun) trains the
    recorder scores' run data-parallel. Either way the table equals the in-process one."""
    unknown = [s for s in config.scores if s not in known()]
    if unknown:
        raise GradsiftError(f"unknown score(s) {unknown}. Known: {', '.join(known())}")
    return score_table(train, config, [s for s in config.scores if s != "random"], backend=backend, comm=comm)


def run_pruning_curve(config: PruningCurveConfig, out_dir: str | Path, *, backend=None) -> dict:
    """Score, prune, retrain, evaluate; write ``summary.json``, ``scores.parquet`` and the
    plot (see the module docstring). Returns the summary.

    ``backend`` (e.g. Ray, :mod:`gradsift.backends`) trains the scoring models
    and the (score, seed) models of each fraction in parallel tasks; the summary is the
    same as in this process."""
    out = Path(out_dir)
    run = RunDir(out)
    train, test = data_mod.load(config.dataset, seed=config.seed)
    train = data_mod.corrupt(train, config.label_noise, config.noise_rate, seed=config.seed)
    if any(not 0 < f <= 1 for f in config.fractions):
        raise GradsiftError(f"fractions must be in (0, 1], got {config.fractions}")
    scores = compute_scores(config, train, backend=backend)
    run.write_scores(scores)
    x, y = train.tensors()
    xt, yt = test.tensors()
    mf_seed = lambda s: mlp_factory(train, width=config.width, seed=config.seed + s)  # noqa: E731
    results: dict[str, dict[str, dict]] = {s: {} for s in config.scores}
    with task("pruning curve: retraining per fraction kept", len(config.fractions)) as advance:
        for frac in sorted(config.fractions):
            names = ["all"] if frac == 1.0 else list(config.scores)
            masks, who = [], []
            for name in names:
                for s in range(config.seeds):
                    if name == "all":
                        keep = np.arange(len(train))
                    else:
                        values = np.zeros(len(train)) if name == "random" else hardness(scores, name)
                        keep = select(values, frac, labels=train.y, class_balanced=config.class_balanced,
                                      prefer="random" if name == "random" else config.prefer, seed=config.seed + s)
                    m = torch.zeros(len(train), dtype=torch.bool)
                    m[torch.from_numpy(keep)] = True
                    masks.append(m)
                    who.append((name, s))
            sizes = {int(m.sum()) for m in masks}
            models = train_members(lambda k: mf_seed(who[k][1])(0), x, y, torch.stack(masks), epochs=config.epochs,
                                   batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay, seed=config.seed, vectorize=None if len(sizes) == 1 else False,
                                   backend=backend)
            accs = (predict_members(models, xt).argmax(-1) == yt).float().mean(1).numpy()
            for name in (config.scores if frac == 1.0 else names):
                a = [float(accs[k]) for k, (n, _) in enumerate(who) if n == (name if frac != 1.0 else "all")]
                results[name][str(frac)] = {"test_acc_mean": float(np.mean(a)), "test_acc_std": float(np.std(a)),
                                            "test_acc": a, "n_kept": int(round(frac * len(train)))}
            advance()
    best = {}
    for frac in sorted(config.fractions):
        if frac < 1.0:
            best[str(frac)] = max(config.scores, key=lambda s: results[s][str(frac)]["test_acc_mean"])
    summary = {"config": {**asdict(config), "n_train": len(train), "n_test": len(test)},
               "results": results, "findings": {"best_score_at": best}}
    write_json(out / "summary.json", summary)
    from ..plotting import plot_pruning_curve

    plot_pruning_curve(summary, out / "pruning_curve.png")
    return summary
