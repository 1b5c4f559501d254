"""Label-issue detection: gradsift's scores against cleanlab, on injected label noise.

    python benchmarks/label_issues.py                  # all settings, prints one table
    python benchmarks/label_issues.py --datasets digits --noise symmetric:0.2

For every data set (scikit-learn digits, MNIST-1D) and noise setting (symmetric and
asymmetric, 20% and 40%), one cross-validated run of gradsift's small MLP
(:func:`gradsift.label_issues.label_issue_signals`) gives

* gradsift's scores: ``combined`` (rank average), ``oof_loss``, ``oof_margin``,
  ``cum_loss`` and ``learning_time`` (training dynamics of the in-fold models);
* the out-of-fold predicted probabilities of the same models, fed to
  ``cleanlab.filter.find_label_issues`` (a boolean mask: its AUROC is that of a 0/1 score,
  its precision that of the examples it flags) and to
  ``cleanlab.rank.get_label_quality_scores`` (self-confidence ranking, ``1 - quality``).

Metrics: AUROC of the score against the true flipped positions, and precision at the
true number of issues (top-k precision; for the cleanlab mask, precision of its flags).
cleanlab is a benchmark dependency (``pip install -e '.[test]'``), not a runtime one.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

import gradsift as gs
from gradsift.label_issues import label_issue_signals


def evaluate(truth: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    k = int(truth.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return float(roc_auc_score(truth, score)), float(truth[top].mean())


def run_setting(dataset: str, kind: str, rate: float, args) -> list[dict]:
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    train, _ = gs.data.load(dataset, seed=args.seed)
    noisy = gs.data.corrupt(train, kind, rate, seed=args.seed)
    truth = noisy.is_noisy
    t = time.time()
    res = label_issue_signals(noisy.x, noisy.y, num_classes=noisy.num_classes, folds=args.folds,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width,
                              seed=args.seed)
    seconds = time.time() - t
    rows = []
    setting = dict(dataset=dataset, noise=f"{kind} {rate:.0%}", n=len(noisy), issues=int(truth.sum()))
    for method in res.signals.columns:
        auroc, prec = evaluate(truth, res.signals[method].to_numpy())
        rows.append({**setting, "method": f"gradsift {method}", "auroc": auroc, "precision": prec})
    mask = cl_find(noisy.y, res.pred_probs)
    rows.append({**setting, "method": "cleanlab find_label_issues", "auroc": float(roc_auc_score(truth, mask)),
                 "precision": float(truth[mask].mean()) if mask.any() else float("nan"),
                 "flagged": int(mask.sum())})
    auroc, prec = evaluate(truth, 1 - get_label_quality_scores(noisy.y, res.pred_probs))
    rows.append({**setting, "method": "cleanlab quality ranking", "auroc": auroc, "precision": prec})
    for r in rows:
        r["cv_seconds"] = round(seconds, 1)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,mnist1d")
    p.add_argument("--noise", default="symmetric:0.2,symmetric:0.4,asymmetric:0.2,asymmetric:0.4")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    rows: list[dict] = []
    for dataset in args.datasets.split(","):
        for spec in args.noise.split(","):
            kind, rate = spec.split(":")
            new = run_setting(dataset, kind, float(rate), args)
            rows += new
            best = max((r for r in new if r["method"].startswith("gradsift")), key=lambda r: r["auroc"])
            cl = max((r for r in new if r["method"].startswith("cleanlab")), key=lambda r: r["auroc"])
            print(f"{dataset} {spec}: best gradsift {best['method']} AUROC {best['auroc']:.4f} vs best cleanlab "
                  f"{cl['method']} {cl['auroc']:.4f} ({new[0]['cv_seconds']} s)", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    table = pd.DataFrame(rows).pivot_table(index=["dataset", "noise"], columns="method", values="auroc", sort=False)
    prec = pd.DataFrame(rows).pivot_table(index=["dataset", "noise"], columns="method", values="precision", sort=False)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    print("\nAUROC (higher is better)")
    print(table.round(4).to_string())
    print("\nprecision at the true number of issues (cleanlab find_label_issues: precision of its flags)")
    print(prec.round(4).to_string())


if __name__ == "__main__":
    main()
