"""A tabular CSV whose labels are class names: find label issues with ``gradsift issues``
and train with ``gradsift train``, from the command line.

    python examples/tabular_csv.py --out runs/example-csv

Writes ``flowers.csv`` (four numeric columns and a ``label`` column of species names, with a
few labels swapped), then runs::

    gradsift issues --dataset flowers.csv --out issues.csv
    gradsift train --dataset flowers.csv --model mlp:width=32 --run-dir run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SPECIES = ("iris", "lily", "rose")


def write_csv(path: Path, n: int = 300, seed: int = 0, swapped: int = 12) -> np.ndarray:
    """Three species as Gaussian blobs in 4 features; ``swapped`` labels changed. Returns
    the rows whose label was swapped."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 4)) + 3.0 * np.eye(3, 4)[k]
    bad = rng.choice(n, swapped, replace=False)
    k[bad] = (k[bad] + 1) % 3
    frame = pd.DataFrame(x.round(4), columns=["sepal", "petal", "stem", "leaf"])
    frame["label"] = [SPECIES[i] for i in k]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return np.sort(bad)


def gradsift(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gradsift", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"gradsift {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/example-csv"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--folds", type=int, default=3)
    args = p.parse_args(argv)

    csv = args.out / "flowers.csv"
    swapped = write_csv(csv)
    print(gradsift("issues", "--dataset", str(csv), "--folds", str(args.folds), "--epochs", str(args.epochs),
                   "--width", "32", "--out", str(args.out / "issues.csv"), "-q"))
    issues = pd.read_csv(args.out / "issues.csv")
    found = np.intersect1d(issues.example_id.to_numpy(), swapped)
    print(f"{len(found)} of the {len(swapped)} swapped labels are among the {len(issues)} flagged rows")
    print(gradsift("train", "--dataset", str(csv), "--model", "mlp:width=32", "--epochs", str(args.epochs),
                   "--run-dir", str(args.out / "run"), "-q"))
    return {"flagged": len(issues), "found": len(found), "swapped": len(swapped)}


if __name__ == "__main__":
    main()
