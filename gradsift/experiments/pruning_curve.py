"""Pruning curves: test accuracy against the fraction of training data kept, per score.

For each score (any registered score, :data:`gradsift.scores.SCORES`, e.g. ``el2n``,
``grand``, ``forgetting``, ``memorization``, ``aum``; and ``random``), the training set is
scored once, then for each fraction fresh models are trained on the kept subset with
several seeds. All models of one fraction have the same subset size, so they train at once
with ``torch.func`` (:func:`gradsift.ensemble.train_members`).

Which end to keep (``prefer``) depends on how much data there is: Sorscher et al. (2022,
"Beyond neural scaling laws") show that keeping the *hardest* examples (Data Diet) helps
when data is abundant, and keeping the *easiest* helps when it is scarce. The crossover
depends on the task and model, so the default, ``prefer="both"``, draws each score both
ways (curves ``"el2n (hard)"`` and ``"el2n (easy)"``); ``"hard"`` or ``"easy"`` draw one
(curve ``"el2n"``). "Hardest" follows the score's registered orientation, so
low-margin/low-AUM examples count as hard.

**Statistics.** Each point is the mean test accuracy over ``seeds`` models with a 95%
Student-t confidence interval. Seed ``s`` gives every curve the same initialization, so a
curve is compared with ``random`` at the same fraction by a paired t-test over seeds
(:func:`compare_with_random`); ``findings`` lists the curves significantly above and below
random (two-sided ``p < 0.05``; with one seed no test is possible and none is listed).

Outputs in ``OUT``:

* ``summary.json``::

      {"config": {...},
       "results": {curve: {fraction (str): {"test_acc_mean": float, "test_acc_std": float,
                                              "ci95": [lo, hi], "test_acc": [per seed], "n_kept": int,
                                              "vs_random": {"diff": float, "p_value": float | None}}}},
       "findings": {"best_score_at": {fraction: curve}, "above_random": {fraction: [curve]},
                    "below_random": {fraction: [curve]}, "better_end": {score: {fraction: "hard"|"easy"}}}}

* ``scores.parquet``: the scores used (one row per ``example_id``; the directory is a run
  directory, so ``gradsift prune --run OUT`` and ``gradsift.open_run(OUT)`` work on it);
* ``pruning_curve.png``: accuracy vs fraction kept, one line per curve (mean, 95% CI).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import data as data_mod
from ..actions import select
from ..errors import GradsiftError
from ..ensemble import mlp_factory, predict_members, train_members
from ..progress import task
from ..rundir import JobCheckpoints, RunDir, checkpointing, fingerprint, write_json
from ..scores import ScoreSettings, hardness, score_names
from ..scores import compute_scores as score_table

PREFER = ("hard", "easy", "both")
SIGNIFICANCE = 0.05


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
    seeds: int = 3
    prefer: str = "both"
    class_balanced: bool = False
    label_noise: str = "none"
    noise_rate: float = 0.0


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """``(mean, lo, hi)``: the Student-t ``level`` confidence interval of the mean of
    ``values`` (``[n]`` per-seed accuracies; sample standard deviation, ``n - 1`` degrees
    of freedom). With ``n < 2`` the interval is unknown: ``(mean, None, None)``."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def compare_with_random(acc: Sequence[float], random_acc: Sequence[float]) -> dict:
    """Paired comparison of a curve's per-seed accuracies with ``random``'s at the same
    fraction (seed ``s`` of both has the same initialization): ``{"diff": mean(acc -
    random_acc), "p_value": two-sided paired t-test p, or None where the test is undefined:
    fewer than 2 seeds, or the same difference for every seed (zero variance; accuracies on
    a small test set are coarse, so that happens by chance and is no evidence)}``."""
    from scipy import stats

    a, r = np.asarray(acc, np.float64), np.asarray(random_acc, np.float64)
    diff = a - r
    p = None
    if len(diff) >= 2 and np.ptp(diff) > 1e-9:
        p = float(stats.ttest_rel(a, r).pvalue)
    return {"diff": float(diff.mean()), "p_value": p}


def format_point(point: dict) -> str:
    """``"mean ± CI half-width"`` of one pruning-curve point, marked ``↑``/``↓`` when it is
    significantly above or below random (``p < SIGNIFICANCE``)."""
    lo, hi = point.get("ci95") or (None, None)
    text = f"{point['test_acc_mean']:.3f}" + (f" ± {(hi - lo) / 2:.3f}" if lo is not None else "")
    vs = point.get("vs_random")
    if vs and vs["p_value"] is not None and vs["p_value"] < SIGNIFICANCE:
        text += " ↑" if vs["diff"] > 0 else " ↓"
    return text


def curves_for(config: "PruningCurveConfig") -> list[tuple[str, str, str]]:
    """``[(curve name, score, prefer)]``: one curve per score, two (``"s (hard)"``,
    ``"s (easy)"``) with ``prefer="both"``; ``random`` is always one curve."""
    out = []
    for name in config.scores:
        if name == "random":
            out.append(("random", "random", "random"))
        elif config.prefer == "both":
            out += [(f"{name} (hard)", name, "hard"), (f"{name} (easy)", name, "easy")]
        else:
            out.append((name, name, config.prefer))
    return out


def summarize(results: dict[str, dict[str, dict]], curves: list[tuple[str, str, str]], fractions) -> dict:
    """Add ``ci95`` and ``vs_random`` to every point of ``results`` (in place) and return
    the ``findings`` (see the module docstring)."""
    best, above, below, ends = {}, {}, {}, {}
    for frac in (str(f) for f in sorted(fractions)):
        for curve, _, _ in curves:
            point = results[curve][frac]
            _, lo, hi = mean_ci(point["test_acc"])
            point["ci95"] = [lo, hi]
            if "random" in results and curve != "random":
                point["vs_random"] = compare_with_random(point["test_acc"], results["random"][frac]["test_acc"])
        if float(frac) < 1.0:
            best[frac] = max((c for c, _, _ in curves), key=lambda c: results[c][frac]["test_acc_mean"])
            tested = [(c, results[c][frac].get("vs_random")) for c, _, _ in curves if c != "random"]
            sig = [(c, v) for c, v in tested if v and v["p_value"] is not None and v["p_value"] < SIGNIFICANCE]
            above[frac] = [c for c, v in sig if v["diff"] > 0]
            below[frac] = [c for c, v in sig if v["diff"] < 0]
            for score in {s for _, s, p in curves if p != "random"}:
                if f"{score} (hard)" in results:
                    h = results[f"{score} (hard)"][frac]["test_acc_mean"]
                    e = results[f"{score} (easy)"][frac]["test_acc_mean"]
                    ends.setdefault(score, {})[frac] = "hard" if h > e else "easy" if e > h else "tie"
    findings = {"best_score_at": best, "above_random": above, "below_random": below}
    if ends:
        findings["better_end"] = ends
    return findings


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


def run_pruning_curve(config: PruningCurveConfig, out_dir: str | Path, *, backend=None, resume: bool = False,
                      overwrite: bool = False) -> dict:
    """Score, prune, retrain, evaluate; write ``summary.json``, ``scores.parquet`` and the
    plot (see the module docstring). Returns the summary.

    ``backend`` (e.g. Ray, :mod:`gradsift.backends`) trains the scoring models
    and the (score, seed) models of each fraction in parallel tasks; the summary is the
    same as in this process.

    ``out_dir`` is a run directory (:meth:`gradsift.rundir.RunDir.start`): a directory
    holding another run is refused unless ``overwrite``; every training checkpoints per
    epoch (or per model) in ``OUT/checkpoints/``, and ``resume`` continues an interrupted
    curve with the same config from there."""
    out = Path(out_dir)
    run = RunDir(out)
    train, test = data_mod.load(config.dataset, seed=config.seed)
    train = data_mod.corrupt(train, config.label_noise, config.noise_rate, seed=config.seed)
    if any(not 0 < f <= 1 for f in config.fractions):
        raise GradsiftError(f"fractions must be in (0, 1], got {config.fractions}")
    if config.prefer not in PREFER:
        raise GradsiftError(f"prefer must be one of {', '.join(PREFER)}, got '{config.prefer}'")
    unknown = [s for s in config.scores if s not in known()]
    if unknown:  # before touching the run directory
        raise GradsiftError(f"unknown score(s) {unknown}. Known: {', '.join(known())}")
    run.start({"command": "pruning-curve", **asdict(config), "data": fingerprint(train)}, resume=resume,
              overwrite=overwrite, job=True, may_differ=(), seed=config.seed)
    try:
        with checkpointing(run):
            summary = _pruning_curve(config, run, train, test, backend)
        JobCheckpoints(run).clear()
        run.update_manifest(status="finished")
    finally:
        run.unlock()
    return summary


def _pruning_curve(config: PruningCurveConfig, run: RunDir, train, test, backend) -> dict:
    out = run.path
    scores = compute_scores(config, train, backend=backend)
    run.write_scores(scores)
    x, y = train.tensors()
    xt, yt = test.tensors()
    mf_seed = lambda s: mlp_factory(train, width=config.width, seed=config.seed + s)  # noqa: E731
    curves = curves_for(config)
    results: dict[str, dict[str, dict]] = {c: {} for c, _, _ in curves}
    with task("pruning curve: retraining per fraction kept", len(config.fractions)) as advance:
        for frac in sorted(config.fractions):
            # at 1.0 every curve keeps everything: one set of models stands for all of them
            trained = [("all", "all", "all")] if frac == 1.0 else curves
            masks, who = [], []
            for curve, name, prefer in trained:
                for s in range(config.seeds):
                    if name == "all":
                        keep = np.arange(len(train))
                    else:
                        values = np.zeros(len(train)) if name == "random" else hardness(scores, name)
                        keep = select(values, frac, labels=train.y, class_balanced=config.class_balanced,
                                      prefer=prefer, seed=config.seed + s)
                    m = torch.zeros(len(train), dtype=torch.bool)
                    m[torch.from_numpy(keep)] = True
                    masks.append(m)
                    who.append((curve, s))
            sizes = {int(m.sum()) for m in masks}
            models = train_members(lambda k: mf_seed(who[k][1])(0), x, y, torch.stack(masks), epochs=config.epochs,
                                   batch_size=config.batch_size, lr=config.lr, momentum=config.momentum,
                                   weight_decay=config.weight_decay, seed=config.seed, vectorize=None if len(sizes) == 1 else False,
                                   backend=backend)
            accs = (predict_members(models, xt).argmax(-1) == yt).float().mean(1).numpy()
            for curve, _, _ in curves:
                a = [float(accs[k]) for k, (c, _) in enumerate(who) if c == (curve if frac != 1.0 else "all")]
                results[curve][str(frac)] = {"test_acc_mean": float(np.mean(a)), "test_acc_std": float(np.std(a)),
                                             "test_acc": a, "n_kept": int(round(frac * len(train)))}
            advance()
    findings = summarize(results, curves, config.fractions)
    summary = {"config": {**asdict(config), "n_train": len(train), "n_test": len(test)},
               "results": results, "findings": findings}
    write_json(out / "summary.json", summary)
    from ..plotting import plot_pruning_curve

    plot_pruning_curve(summary, out / "pruning_curve.png")
    return summary
