"""Validate cheap memorization proxies against Feldman-Zhang memorization.

Ground truth: ``mem(i) = P[correct on i | i in train] - P[correct on i | i held out]``
from ``mem_models`` (default 64) MLPs trained at once with ``vmap``, each on a random half
of the data (:func:`gradsift.scores.memorization_scores`). Labels are corrupted first
(``noise_rate``), so there is a second ground truth: the injected label errors.

Every cheap score (any registered score, plus ``grand_init``: GraNd at initialization) is
computed with ``seeds`` training seeds, oriented so that higher is harder
(:func:`gradsift.scores.hardness`), and compared with

* ``spearman``: Spearman correlation with ``mem`` (examples where ``mem`` is defined);
* ``auroc``: AUROC for finding the injected label errors;

each as the mean over seeds with a 95% bootstrap interval (examples resampled, the same
resamples for every seed; ``bootstrap`` resamples). ``random`` is the baseline row.

Two known traps are flagged in ``warnings``:

* GraNd at initialization tracks the input norm and does not beat random pruning (Kirsch,
  "Does 'Deep Learning on a Data Diet' reproduce?", arXiv 2303.14753); the Spearman
  correlation of ``grand_init`` with ``||x||`` is reported.
* Models that never fit the injected label errors memorize nothing, and the ground truth
  is then noise: when the mean memorization of the label errors (``mem_label_errors``) is
  below ``MEMORIZATION_FLOOR`` the correlations are not evidence either way. Measured on
  600 digits with 10% flipped labels, 64 models: label errors' mean memorization 0.027
  after 15 epochs and 0.315 after 40, when AUM, confidence, self-influence and cumulative
  loss reached Spearman 0.74-0.78 (every score was within 0.07 of 0 at 15 epochs); hence
  the default of 40 epochs.

Outputs in ``OUT``: ``validation.csv`` (one row per score), ``summary.json`` (config,
rows, warnings) and ``validate_scores.png`` (both metrics with their intervals).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from .. import data as data_mod
from ..ensemble import mlp_factory
from ..errors import GradsiftError
from ..rundir import write_json
from ..scores import ScoreSettings, compute_scores, data_diet_scores, hardness, memorization_scores, score_names

MEMORIZATION_FLOOR = 0.1
NO_MEMORIZATION_WARNING = ("the models barely memorized the injected label errors (their mean memorization is "
                           "{m:.3f} < {floor}), so the memorization ground truth is mostly noise and its Spearman "
                           "column is not evidence; train longer (--epochs) or wider (--width)")
GRAND_INIT_WARNING = ("GraNd at initialization tracks the input norm (Spearman with ||x||: {r:.2f}) and does not "
                      "beat random pruning; use it after some training (Kirsch, arXiv 2303.14753)")


@dataclass
class ValidateScoresConfig(ScoreSettings):
    """Settings (defaults: a few minutes on 2 CPU cores); scoring settings as
    :class:`gradsift.scores.ScoreSettings`."""

    dataset: str = "digits"
    n_train: int | None = 600
    epochs: int = 40
    label_noise: str = "symmetric"
    noise_rate: float = 0.1
    mem_models: int = 64
    mem_fraction: float = 0.5
    scores: tuple[str, ...] = ("loss", "el2n", "grand", "grand_init", "forgetting", "learning_time", "cum_loss",
                               "aum", "confidence", "variability", "self_influence", "alignment")
    seeds: int = 2
    bootstrap: int = 200


def memorization_check(mem: np.ndarray, truth: np.ndarray) -> tuple[float | None, str | None]:
    """``(mean memorization of the label errors, warning or None)`` from ``mem`` ``[N]``
    (NaN where undefined) and ``truth`` ``[N]`` bool (injected label errors); the warning
    says the ground truth is noise when that mean is below :data:`MEMORIZATION_FLOOR`."""
    m = mem[truth]
    m = m[np.isfinite(m)]
    if not len(m):
        return None, None
    mean = float(m.mean())
    return mean, (NO_MEMORIZATION_WARNING.format(m=mean, floor=MEMORIZATION_FLOOR) if mean < MEMORIZATION_FLOOR else None)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def _auroc(truth: np.ndarray, score: np.ndarray) -> float:
    ok = np.isfinite(score)
    t = truth[ok]
    if t.all() or not t.any():
        return float("nan")
    return float(roc_auc_score(t, score[ok]))


def _mean(values) -> float:
    """Mean of the finite values (NaN, silently, when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def validation_table(values: dict[str, list[np.ndarray]], mem: np.ndarray, truth: np.ndarray, *,
                     bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """The table from oriented scores.

    Args:
        values: score name -> per seed ``[N]`` higher-is-harder values.
        mem: ``[N]`` memorization (NaN where undefined); truth: ``[N]`` bool label errors.

    Returns:
        One row per score: ``spearman, spearman_lo, spearman_hi, auroc, auroc_lo, auroc_hi,
        seeds`` (mean over seeds and 95% bootstrap interval).
    """
    rng = np.random.default_rng(seed)
    n = len(mem)
    resamples = [rng.integers(0, n, n) for _ in range(bootstrap)]
    rows = []
    for name, per_seed in values.items():
        sp = _mean([_spearman(v, mem) for v in per_seed])
        au = _mean([_auroc(truth, v) for v in per_seed])
        bs_sp = np.array([_mean([_spearman(v[r], mem[r]) for v in per_seed]) for r in resamples])
        bs_au = np.array([_mean([_auroc(truth[r], v[r]) for v in per_seed]) for r in resamples])
        bs_sp, bs_au = bs_sp[np.isfinite(bs_sp)], bs_au[np.isfinite(bs_au)]
        ci = lambda b, q: float(np.percentile(b, q)) if len(b) else float("nan")  # noqa: E731
        rows.append({"score": name, "spearman": sp, "spearman_lo": ci(bs_sp, 2.5), "spearman_hi": ci(bs_sp, 97.5),
                     "auroc": au, "auroc_lo": ci(bs_au, 2.5), "auroc_hi": ci(bs_au, 97.5),
                     "seeds": len(per_seed)})
    return pd.DataFrame(rows)


def run_validate_scores(config: ValidateScoresConfig, out_dir: str | Path, *, backend=None) -> dict:
    """Run the validation (see the module docs); returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    known = set(score_names()) | {"grand_init"}
    unknown = [s for s in config.scores if s not in known]
    if unknown:
        raise GradsiftError(f"unknown score(s) {unknown}. Known: {', '.join(sorted(known))}")
    train, _ = data_mod.load(config.dataset, seed=config.seed)
    if config.n_train is not None and config.n_train < len(train):
        train = train.subset(np.random.default_rng(config.seed).permutation(len(train))[: config.n_train])
    train = data_mod.corrupt(train, config.label_noise, config.noise_rate, seed=config.seed)
    truth = train.is_noisy
    mf = mlp_factory(train, width=config.width, seed=config.seed + 1000)
    mem = memorization_scores(train, mf, n_models=config.mem_models, fraction=config.mem_fraction,
                              epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                              momentum=config.momentum, weight_decay=config.weight_decay, seed=config.seed,
                              backend=backend)["mem"].to_numpy()
    registered = [s for s in config.scores if s != "grand_init"]
    values: dict[str, list[np.ndarray]] = {s: [] for s in config.scores}
    values["random"] = []
    for s in range(config.seeds):
        settings = replace(ScoreSettings(**{k: getattr(config, k) for k in asdict(ScoreSettings())}),
                           seed=config.seed + s)
        if registered:
            table = compute_scores(train, settings, registered, backend=backend)
            for name in registered:
                values[name].append(hardness(table, name))
        if "grand_init" in config.scores:
            init = data_diet_scores(train, mlp_factory(train, width=config.width, seed=config.seed + s + 2000),
                                    n_inits=config.diet_inits, epochs=0, scores=("grand",))
            values["grand_init"].append(init["grand"].to_numpy())
        values["random"].append(np.random.default_rng(config.seed + s).random(len(train)))
    table = validation_table(values, mem, truth, bootstrap=config.bootstrap, seed=config.seed)
    warnings = []
    if "grand_init" in config.scores:
        r = _spearman(values["grand_init"][0], np.linalg.norm(train.x.reshape(len(train), -1), axis=1))
        warnings.append(GRAND_INIT_WARNING.format(r=r))
        table.loc[table.score == "grand_init", "warning"] = "Kirsch 2303.14753: tracks input norm"
    mem_errors, warning = memorization_check(mem, truth)
    if warning:
        warnings.append(warning)
    table.to_csv(out / "validation.csv", index=False)
    summary = {"config": asdict(config), "n_train": len(train), "label_errors": int(truth.sum()),
               "mem_defined": int(np.isfinite(mem).sum()), "mem_mean": float(np.nanmean(mem)),
               "mem_label_errors": mem_errors,
               "rows": table.to_dict("records"), "warnings": warnings}
    write_json(out / "summary.json", summary)
    plot_validation(table, out / "validate_scores.png")
    return summary


def plot_validation(table: pd.DataFrame, path: str | Path) -> Path:
    """Bar charts of Spearman (with memorization) and AUROC (label errors), 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(table) + 1.5), sharey=True)
    ypos = np.arange(len(table))
    for ax, col, ref, label in ((axes[0], "spearman", 0.0, "Spearman with FZ memorization"),
                                (axes[1], "auroc", 0.5, "AUROC, injected label errors")):
        v = table[col].to_numpy()
        err = np.vstack([v - table[f"{col}_lo"].to_numpy(), table[f"{col}_hi"].to_numpy() - v])
        ax.barh(ypos, v - ref, left=ref, xerr=err, color=["#999" if s == "random" else "#1f77b4" for s in table.score])
        ax.axvline(ref, color="k", lw=0.8)
        ax.set_xlabel(label)
    axes[0].set_yticks(ypos, table.score)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
