"""Data from user files: ``.npz`` and CSV, and :func:`load` by name or path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import DataError
from .builtin import BUILTIN, load_digits, load_mnist1d
from .dataset import Dataset


def _split(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = max(1, int(round(test_fraction * len(data))))
    if n_test >= len(data):
        raise DataError(f"too few examples ({len(data)}) to hold out a test split")
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def _num_classes(*ys: np.ndarray) -> int:
    return int(max(int(np.max(y)) for y in ys if len(y)) + 1)


def load_npz(
    path: str | Path, *, x_key: str = "x", y_key: str = "y", test_fraction: float = 0.2,
    seed: int = 0, num_classes: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Load ``x``/``y`` arrays from an ``.npz`` file.

    If the file also holds ``x_test``/``y_test`` they form the test split; otherwise
    ``test_fraction`` of the examples are held out (shuffled with ``seed``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    with np.load(path) as f:
        keys = set(f.files)
        for k in (x_key, y_key):
            if k not in keys:
                raise DataError(f"{path} has no array '{k}' (it has: {', '.join(sorted(keys))})")
        x, y = f[x_key], f[y_key]
        has_test = {"x_test", "y_test"} <= keys
        xt, yt = (f["x_test"], f["y_test"]) if has_test else (None, None)
    _precheck(x, y)
    k = num_classes or _num_classes(y, *(() if yt is None else (yt,)))
    shape = tuple(x.shape[1:]) if x.ndim > 1 else None
    full = Dataset(x, y, k, name=path.stem, shape=shape)
    if has_test:
        _precheck(xt, yt)
        test = Dataset(xt, yt, k, example_ids=np.arange(len(yt)) + len(y), name=path.stem, shape=shape)
        return full, test
    return _split(full, test_fraction, seed)


def _precheck(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) == 0 or len(y) == 0:
        raise DataError("the data set is empty (no examples)")
    if len(x) != len(y):
        raise DataError(f"features and labels have different lengths: {len(x)} vs {len(y)}")


def load_csv(
    path: str | Path, *, label_column: str = "label", test_fraction: float = 0.2, seed: int = 0,
    num_classes: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Load a CSV with a header: numeric feature columns and one integer label column."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path} is empty") from None
        if label_column not in header:
            raise DataError(
                f"{path} has no column '{label_column}' (columns: {', '.join(header)}); "
                "pass label_column=..."
            )
        li = header.index(label_column)
        xs, ys = [], []
        for row_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{row_no}: {len(row)} fields, header has {len(header)}")
            try:
                ys.append(int(float(row[li])))
                xs.append([float(v) for j, v in enumerate(row) if j != li])
            except ValueError as e:
                raise DataError(f"{path}:{row_no}: not a number ({e})") from None
    x, y = np.asarray(xs, np.float32), np.asarray(ys, np.int64)
    _precheck(x, y)
    k = num_classes or _num_classes(y)
    return _split(Dataset(x, y, k, name=path.stem, shape=(x.shape[1],)), test_fraction, seed)


def load(name_or_path: str, *, seed: int = 0, **kwargs) -> tuple[Dataset, Dataset]:
    """Load a built-in data set by name (``digits``, ``mnist1d``) or a ``.npz``/``.csv`` file."""
    if name_or_path == "digits":
        return load_digits(seed=seed, **kwargs)
    if name_or_path == "mnist1d":
        return load_mnist1d(**kwargs)
    path = Path(name_or_path)
    if path.suffix == ".npz":
        return load_npz(path, seed=seed, **kwargs)
    if path.suffix == ".csv":
        return load_csv(path, seed=seed, **kwargs)
    raise DataError(
        f"unknown data set '{name_or_path}': use one of {', '.join(BUILTIN)} or a path to a "
        ".npz or .csv file"
    )
