"""The audit command's library side: audit a :class:`gradsift.data.Dataset` and write
what it found into a directory.

Outputs in ``OUT``:

* ``audit.parquet``: the :func:`gradsift.audit` table (one row per ``example_id``, a column);
* ``summary.json``: :func:`gradsift.audit.audit_summary`, plus ``injected`` (precision,
  recall and AUROC of the label flags) when the data set's labels were corrupted;
* ``datamap.png``: the data map of the fold models, injected label errors marked;
* ``explorer.html``: the offline explorer page (:mod:`gradsift.explorer`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..audit import run_audit
from ..data import Dataset
from ..datamap import plot_data_map
from ..explorer import write_explorer
from ..rundir import write_json, write_parquet


def run_audit_experiment(data: Dataset, out: str | Path, **kwargs) -> dict:
    """Audit ``data`` (``kwargs`` go to :func:`gradsift.audit.run_audit`) and write the files
    above; returns the summary (with ``files``, the names written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_audit(data, num_classes=data.num_classes, **kwargs)
    table = res.table
    summary = dict(table.attrs["summary"])
    injected = data.example_ids[data.corrupted] if len(data.corrupted) else np.zeros(0, np.int64)
    if len(injected):
        from sklearn.metrics import roc_auc_score

        truth = data.is_noisy
        flag = table["is_label"].to_numpy()
        summary["injected"] = {
            "label_errors": int(truth.sum()),
            "precision": float(truth[flag].mean()) if flag.any() else 0.0,
            "recall": float(flag[truth].mean()),
            "auroc": float(roc_auc_score(truth, table["label_score"].to_numpy())),
        }
    table.attrs = {}
    write_parquet(out / "audit.parquet", table.reset_index())  # example_id as a column
    plot_data_map(table, out / "datamap.png", marked=injected, title=f"Data map of {data.name}")
    write_explorer(table.assign(**({"injected": data.is_noisy} if len(injected) else {})), out / "explorer.html",
                   inputs=data.x, shape=data.shape, title=f"gradsift audit of {data.name}")
    summary["files"] = ["audit.parquet", "summary.json", "datamap.png", "explorer.html"]
    write_json(out / "summary.json", summary)
    return summary
