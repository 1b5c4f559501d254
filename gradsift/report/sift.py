"""Report sections about the data: per-example score histograms, label issues with the
examples drawn, pruning curves. Each builder returns ``None`` when its data is absent."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from ..rundir import RunDir
from . import figures
from .html import ReportError, Section, esc, figure, fmt, table

# Columns of per-example tables that are identifiers or labels, not scores.
NOT_SCORES = {"example_id", "epoch", "step", "position", "label", "given_label", "suggested_label",
              "y", "target", "clean_label", "seed", "index"}
FLAG_COLUMNS = ("corrupted", "is_noisy", "noisy", "is_corrupted")


# ------------------------------------------------------------------ score histograms

def read_scores(run: Path) -> pd.DataFrame | None:
    """Per-example scores of a run directory (``RUN/scores.parquet``), one row per example
    (``example_id`` index); ``None`` when it has none."""
    rd = RunDir(run)
    if not rd.has_table("scores"):
        return None
    scores = rd.scores()
    return scores if len(scores) else None


def score_columns(scores: pd.DataFrame) -> list[str]:
    """Numeric columns that are scores (not ids, labels or flags)."""
    return [
        c for c in scores.columns
        if c not in NOT_SCORES and c not in FLAG_COLUMNS
        and pd.api.types.is_numeric_dtype(scores[c]) and not pd.api.types.is_bool_dtype(scores[c])
    ]


def corrupted_ids(config: Mapping[str, Any], seed: int, scores: pd.DataFrame | None = None) -> set[int] | None:
    """Example ids whose training label the run corrupted on purpose, recomputed from the
    recorded ``dataset``, ``label_noise``, ``noise_rate`` and ``seed`` (as ``gradsift train``
    corrupts them, deterministically). ``None`` when the run corrupted nothing, or when the
    recomputed labels disagree with the ``label`` column of ``scores`` (a different recipe)."""
    kind, dataset = config.get("label_noise"), config.get("dataset")
    if not dataset or kind in (None, "", "none") or (kind != "random" and not config.get("noise_rate")):
        return None
    from .. import data as data_mod

    try:
        train, _ = data_mod.load(str(dataset), seed=seed)
        noisy = data_mod.corrupt(train, str(kind), float(config.get("noise_rate") or 0.0), seed=seed)
    except Exception:  # the data set moved or the recipe is unknown: no overlay
        return None
    if scores is not None and "label" in scores:
        given = pd.Series(noisy.y, index=noisy.example_ids)
        shared = scores.index.intersection(given.index)
        if len(shared) != len(scores) or (given.loc[shared].to_numpy() != scores.loc[shared, "label"].to_numpy()).any():
            return None
    return set(noisy.example_ids[noisy.corrupted].tolist())


def scores_section(scores: pd.DataFrame | None, prefix: str = "", *,
                   corrupted: set[int] | None = None) -> Section | None:
    """A histogram of each per-example score; examples with a corrupted label (from a flag
    column of the table or the ids in ``corrupted``) stacked in red."""
    if scores is None or not len(scores):
        return None
    cols = score_columns(scores)
    if not cols:
        return None
    flag_col = next((c for c in FLAG_COLUMNS if c in scores), None)
    flagged = scores[flag_col].fillna(False).to_numpy(bool) if flag_col else None
    if flagged is None and corrupted:
        flagged = scores.index.isin(list(corrupted))
    plots = "".join(
        figure(figures.score_histogram(scores[c].to_numpy(float), c, flagged=flagged),
               f"{prefix}score-{c}", f"distribution of {c} over {len(scores)} examples")
        for c in cols
    )
    stats = table(
        ["score", "mean", "std", "min", "median", "max"],
        [[c, *(float(getattr(scores[c], f)()) for f in ("mean", "std", "min", "median", "max"))] for c in cols],
    )
    note = f'<p class="note">{len(cols)} per-example scores of {len(scores)} training examples'
    note += f"; red: examples whose label was corrupted ({int(flagged.sum())})." if flagged is not None else "."
    return Section(f"{prefix}scores", "Per-example scores", note + "</p>" + stats + f'<div class="plots">{plots}</div>')


# ------------------------------------------------------------------ label issues

ISSUE_COLUMNS = {
    "score": ("score", "issue_score", "label_issue_score"),
    "given": ("given_label", "given", "label", "y"),
    "suggested": ("suggested_label", "suggested", "predicted_label", "prediction"),
}


def _pick(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in df.columns), None)


@lru_cache(maxsize=4)
def _dataset_examples(dataset: str, seed: int) -> tuple[dict[int, np.ndarray], tuple[int, ...] | None]:
    from .. import data as data_mod

    train, test = data_mod.load(dataset, seed=seed)
    lookup: dict[int, np.ndarray] = {}
    for part in (test, train):
        lookup.update(zip(part.example_ids.tolist(), part.x))
    return lookup, train.shape


def load_examples(dataset: str | None, seed: int = 0) -> tuple[dict[int, np.ndarray], tuple[int, ...] | None, str]:
    """``(example_id -> features, example shape, note)``; empty with a note explaining why
    when the data set cannot be loaded (e.g. a file that has moved)."""
    if not dataset:
        return {}, None, "the data set is not recorded, so examples are not drawn"
    try:
        lookup, shape = _dataset_examples(str(dataset), int(seed))
    except Exception as e:  # a moved file, a missing optional package: report, don't fail
        return {}, None, f"examples not drawn: could not load data set '{dataset}' ({e})"
    return lookup, shape, ""


def issues_section(issues: pd.DataFrame, *, dataset: str | None, seed: int = 0, top: int = 12,
                   corrupted_ids: set[int] | None = None, prefix: str = "") -> Section | None:
    """The ``top`` highest-scored label issues, each example drawn with its given and
    suggested label, plus a table of the next ones."""
    if issues is None or not len(issues) or "example_id" not in issues:
        return None
    score_c, given_c, sugg_c = (_pick(issues, ISSUE_COLUMNS[k]) for k in ("score", "given", "suggested"))
    ranked = issues.sort_values(score_c, ascending=False) if score_c else issues
    lookup, shape, note = load_examples(dataset, seed)
    if "corrupted" in ranked and corrupted_ids is None:
        corrupted_ids = set(ranked.loc[ranked["corrupted"].astype(bool), "example_id"].astype(int))
    cards = []
    for _, row in ranked.head(top).iterrows():
        eid = int(row["example_id"])
        items = {"example": eid}
        if score_c:
            items["score"] = float(row[score_c])
        if given_c:
            items["given"] = row[given_c]
        if sugg_c:
            items["suggested"] = row[sugg_c]
        if corrupted_ids is not None:
            items["corrupted"] = eid in corrupted_ids
        drawing = ""
        if eid in lookup:
            drawing = figure(figures.example_drawing(lookup[eid], shape), f"{prefix}issue-{eid}",
                             alt=f"example {eid}", dpi=80)
        dl = "".join(f"<dt>{esc(k)}</dt><dd>{fmt(v)}</dd>" for k, v in items.items())
        cards.append(f'<div class="card" data-example-id="{eid}">{drawing}<dl>{dl}</dl></div>')
    shown = min(top, len(ranked))
    head = f'<p class="note">{len(ranked)} flagged examples, highest score first; the top {shown} drawn.'
    if note:
        head += f" {esc(note)}."
    if corrupted_ids is not None:
        hits = sum(int(e) in corrupted_ids for e in ranked.head(top)["example_id"])
        head += f" {hits} of the top {shown} had their label corrupted on purpose."
    head += "</p>"
    rest = ranked.iloc[top:top + 40]
    more = ""
    if len(rest):
        cols = [c for c in ("example_id", score_c, given_c, sugg_c, "corrupted" if "corrupted" in rest else None) if c]
        more = "<h3>Next issues</h3>" + table(cols, rest[cols].itertuples(index=False))
    return Section(f"{prefix}issues", "Label issues", head + f'<div class="cards">{"".join(cards)}</div>' + more)


# ------------------------------------------------------------------ pruning curves

def pruning_tables(summary: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """score -> DataFrame(fraction, mean, std) from a pruning-curve summary.

    Accepts ``{"results"|"curves"|"accuracy": {score: {fraction: number | {"test_acc_mean",
    "test_acc_std"} | {"mean", "std"} | {"test_acc": [per seed]}}}}`` (``gradsift
    pruning-curve`` writes the first dict form) or a list of rows ``{score, fraction,
    mean|test_acc, std}``.
    """
    data = next((summary[k] for k in ("curves", "results", "accuracy", "pruning") if k in summary), None)
    out: dict[str, pd.DataFrame] = {}
    if isinstance(data, Mapping):
        for score, by_fraction in data.items():
            if not isinstance(by_fraction, Mapping):
                continue
            rows = []
            for frac, v in by_fraction.items():
                try:
                    f = float(frac)
                except ValueError:
                    continue
                if isinstance(v, Mapping):
                    mean = next((v[k] for k in ("test_acc_mean", "mean", "test_acc") if k in v), np.nan)
                    std = next((v[k] for k in ("test_acc_std", "std") if k in v), None)
                    if isinstance(mean, (list, tuple)):  # per-seed accuracies
                        mean, std = float(np.mean(mean)), float(np.std(mean)) if std is None else std
                    rows.append({"fraction": f, "mean": float(mean), "std": float(std or 0.0)})
                else:
                    rows.append({"fraction": f, "mean": float(v), "std": 0.0})
            if rows:
                out[str(score)] = pd.DataFrame(rows)
    elif isinstance(data, list) and data and isinstance(data[0], Mapping):
        df = pd.DataFrame(data)
        mean_c = _pick(df, ("mean", "test_acc", "accuracy"))
        if {"score", "fraction"} <= set(df.columns) and mean_c:
            df = df.rename(columns={mean_c: "mean"})
            for score, part in df.groupby("score"):
                out[str(score)] = part[["fraction", "mean"] + (["std"] if "std" in part else [])]
    return out


def pruning_section(summary: Mapping[str, Any], prefix: str = "") -> Section | None:
    """Test accuracy against the fraction kept, per score, with a table."""
    curves = pruning_tables(summary)
    if not curves:
        return None
    fractions = sorted({f for df in curves.values() for f in df["fraction"]})
    rows = []
    for score, df in curves.items():
        by = dict(zip(df["fraction"], df["mean"]))
        rows.append([score, *(float(by.get(f, np.nan)) for f in fractions)])
    body = (
        '<p class="note">Test accuracy after retraining on the fraction of the training set kept by '
        "each score (mean ± std over seeds); <i>random</i> is the baseline.</p>"
        + f'<div class="plots">{figure(figures.pruning_curves(curves), f"{prefix}pruning", "test accuracy vs fraction kept")}</div>'
        + table(["score", *(f"keep {f:g}" for f in fractions)], rows, table_id=f"{prefix}pruning-table")
    )
    return Section(f"{prefix}pruning", "Pruning curves", body)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when there is no such file."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path} does not hold a JSON object; fix or delete it")
    return value
