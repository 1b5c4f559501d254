"""gs.audit against cleanlab's Datalab on the same data and the same out-of-fold probabilities.

    python -m benchmarks.audit                        # digits and MNIST-1D, prints one table
    python -m benchmarks.audit --datasets digits --epochs 10 --json out.json
    python -m benchmarks.audit --markdown benchmarks/AUDIT.md   # the committed results

For each data set the training split gets three kinds of injected issues:

* label errors: ``--label-rate`` of the examples get another class (symmetric);
* outliers: ``--outlier-rate`` x N new examples from another distribution: a real
  example with its features randomly permuted (same values, no structure), random label;
* near-duplicates: ``--dup-rate`` x N new copies of random examples plus Gaussian noise
  of 1% of the features' standard deviation, with the source's label.

gradsift: :func:`gradsift.audit.run_audit` (both label cut-offs: confident learning's
per-class thresholds and AUM threshold samples). cleanlab: ``Datalab.find_issues`` with
``pred_probs`` = gradsift's out-of-fold probabilities (the same models) and
``features`` = the input features (Datalab's default use), and again with the fold-0
model's embeddings as features.

Metrics per issue type: AUROC of the score (Datalab's quality scores are negated: low
quality = suspect) and precision / recall / F1 of the flagged set. Label metrics are over
the non-outlier rows (an outlier's random label is not an injected label error);
near-duplicate truth is every member of an injected pair (copy and source).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

import gradsift as gs
from gradsift.audit import run_audit


def inject(dataset: str, label_rate: float, outlier_rate: float, dup_rate: float, seed: int) -> dict:
    """The data set with injected issues and the truth masks."""
    train, _ = gs.data.load(dataset, seed=seed)
    rng = np.random.default_rng(seed)
    x = train.x.reshape(len(train), -1).astype(np.float32)
    y = train.y.copy()
    n, c = len(y), train.num_classes
    flipped = np.zeros(n, bool)
    flip = rng.choice(n, int(round(label_rate * n)), replace=False)
    y[flip] = (y[flip] + rng.integers(1, c, len(flip))) % c
    flipped[flip] = True
    n_out = int(round(outlier_rate * n))
    src = rng.choice(n, n_out, replace=False)
    outliers = np.stack([x[i][rng.permutation(x.shape[1])] for i in src])
    out_y = rng.integers(0, c, n_out)
    n_dup = int(round(dup_rate * n))
    dsrc = rng.choice(n, n_dup, replace=False)
    dups = x[dsrc] + rng.normal(0, 0.01, (n_dup, x.shape[1])).astype(np.float32) * x.std(0, keepdims=True)
    X = np.concatenate([x, outliers, dups]).astype(np.float32)
    Y = np.concatenate([y, out_y, y[dsrc]])
    m = len(Y)
    is_out = np.zeros(m, bool)
    is_out[n : n + n_out] = True
    is_dup = np.zeros(m, bool)
    is_dup[n + n_out :] = True
    is_dup[dsrc] = True
    is_label = np.zeros(m, bool)
    is_label[:n] = flipped
    is_label[n + n_out :] = flipped[dsrc]  # a copy keeps its source's (possibly flipped) label
    return dict(X=X, y=Y, num_classes=c, truth={"label": is_label, "outlier": is_out, "near_duplicate": is_dup})


def metrics(truth: np.ndarray, score: np.ndarray, flag: np.ndarray, rows: np.ndarray) -> dict:
    t, s, f = truth[rows], score[rows], flag[rows]
    tp = int((t & f).sum())
    p = tp / max(int(f.sum()), 1)
    r = tp / max(int(t.sum()), 1)
    return {"auroc": float(roc_auc_score(t, s)), "precision": p, "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0, "flagged": int(f.sum()), "true": int(t.sum())}


def datalab(y: np.ndarray, pred_probs: np.ndarray, features: np.ndarray) -> dict:
    from cleanlab import Datalab

    lab = Datalab(data={"label": y}, label_name="label", verbosity=0)
    lab.find_issues(features=features, pred_probs=pred_probs,
                    issue_types={"label": {}, "outlier": {}, "near_duplicate": {}})
    out = {}
    for kind in ("label", "outlier", "near_duplicate"):
        issues = lab.get_issues(kind)
        out[kind] = (-issues[f"{kind}_score"].to_numpy(), issues[f"is_{kind}_issue"].to_numpy())
    return out


def run_dataset(dataset: str, args) -> list[dict]:
    data = inject(dataset, args.label_rate, args.outlier_rate, args.dup_rate, args.seed)
    X, y, truth = data["X"], data["y"], data["truth"]
    kw = dict(num_classes=data["num_classes"], folds=args.folds, epochs=args.epochs, width=args.width, seed=args.seed)
    rows_all = np.ones(len(y), bool)
    rows_label = ~truth["outlier"]
    setting = dict(dataset=dataset, n=len(y), label_errors=int(truth["label"].sum()),
                   outliers=int(truth["outlier"].sum()), near_duplicates=int(truth["near_duplicate"].sum()))
    out = []
    t = time.time()
    res = run_audit(X, y, label_threshold="confident", **kw)
    seconds = time.time() - t
    tab = res.table
    methods: dict[str, dict] = {"gradsift audit": {
        "label": (tab.label_score.to_numpy(), tab.is_label.to_numpy()),
        "outlier": (tab.outlier_score.to_numpy(), tab.is_outlier.to_numpy()),
        "near_duplicate": (tab.near_duplicate_score.to_numpy(), tab.is_near_duplicate.to_numpy())}}
    if not args.no_aum:
        t2 = time.time()
        aum = run_audit(X, y, label_threshold="aum", **kw).table
        methods["gradsift audit (label cut: AUM threshold samples)"] = {
            "label": (aum.label_score.to_numpy(), aum.is_label.to_numpy())}
        methods["gradsift AUM score alone"] = {"label": (-aum.aum.to_numpy(), aum.is_label.to_numpy())}
        print(f"{dataset}: AUM run {time.time() - t2:.0f}s", flush=True)
    methods["cleanlab Datalab (input features)"] = datalab(y, res.pred_probs, X)
    methods["cleanlab Datalab (embedding features)"] = datalab(y, res.pred_probs, res.embeddings[0])
    for name, by_kind in methods.items():
        for kind, (score, flag) in by_kind.items():
            rows = rows_label if kind == "label" else rows_all
            out.append({**setting, "method": name, "issue": kind, **metrics(truth[kind], score, flag, rows)})
    print(f"{dataset}: audit {seconds:.0f}s", flush=True)
    return out


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist1d")
    ap.add_argument("--label-rate", type=float, default=0.1)
    ap.add_argument("--outlier-rate", type=float, default=0.03)
    ap.add_argument("--dup-rate", type=float, default=0.03)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-aum", action="store_true", help="skip the AUM threshold-sample runs")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--markdown", default=None, help="also write the table as a Markdown page here")
    args = ap.parse_args(argv)
    rows = [r for d in args.datasets.split(",") for r in run_dataset(d.strip(), args)]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["dataset", "issue", "method", "auroc", "precision", "recall", "f1", "flagged", "true"]]
              .round(3).to_string(index=False))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        write_markdown(table, args, args.markdown)
    return table


def write_markdown(table: pd.DataFrame, args, path: str) -> None:
    """The results as a Markdown page: the command, the setting and one table per data set."""
    import subprocess
    import sys

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# gs.audit against cleanlab's Datalab", "",
             f"Generated by `python -m benchmarks.audit {' '.join(sys.argv[1:])}` at commit {commit or '?'}; "
             f"{args.folds} folds, {args.epochs} epochs, width {args.width}, seed {args.seed}. Injected: "
             f"{args.label_rate:.0%} label errors, {args.outlier_rate:.0%} outliers (scrambled examples), "
             f"{args.dup_rate:.0%} near-duplicates. Both methods see the same out-of-fold probabilities. "
             "See the module docstring of `benchmarks/audit.py` for the method.", ""]
    cols = ["issue", "method", "auroc", "precision", "recall", "f1", "flagged", "true"]
    for dataset, rows in table.groupby("dataset", sort=False):
        first = rows.iloc[0]
        lines += [f"## {dataset} (N = {first.n}: {first.label_errors} label errors, {first.outliers} outliers, "
                  f"{first.near_duplicates} near-duplicate members)", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in rows.sort_values("issue", kind="stable").iterrows():
            lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
