"""Data: built-in data sets, user files, and label corruption.

Built-in data never touches the network: scikit-learn's ``digits`` ships inside
scikit-learn, and MNIST-1D is generated locally with the ``mnist1d`` package's generator.

Every example carries a stable integer ``example_id`` (its row in the source file or
generator output) so that scores and label issues can be joined back to the data.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

BUILTIN = ("digits", "mnist1d")


@dataclass
class Dataset:
    """An in-memory labelled data set.

    Attributes:
        x: ``[N, ...]`` float32 features.
        y: ``[N]`` int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
        example_ids: ``[N]`` int64 stable ids.
        name: a short name.
        shape: the shape of one example for drawing (``(8, 8)`` for digits images,
            ``(40,)`` for MNIST-1D), or ``None``.
        clean_y: the labels before corruption, when labels were corrupted.
        corrupted: ``[K]`` positions whose label was changed by corruption.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    example_ids: np.ndarray = None  # type: ignore[assignment]
    name: str = "data"
    shape: tuple[int, ...] | None = None
    clean_y: np.ndarray | None = None
    corrupted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float32)
        self.y = np.asarray(self.y)
        if self.example_ids is None:
            self.example_ids = np.arange(len(self.y), dtype=np.int64)
        validate(self.x, self.y, self.num_classes)
        self.y = self.y.astype(np.int64)
        self.example_ids = np.asarray(self.example_ids, dtype=np.int64)
        if len(self.example_ids) != len(self.y):
            raise DataError(
                f"example_ids has {len(self.example_ids)} entries but there are {len(self.y)} labels"
            )

    def __len__(self) -> int:
        return len(self.y)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [N, ...] float32, y [N] int64)`` as torch tensors."""
        return torch.from_numpy(self.x), torch.from_numpy(self.y)

    def subset(self, index: np.ndarray) -> "Dataset":
        """The examples at positions ``index`` (ids kept)."""
        index = np.asarray(index, dtype=np.int64)
        pos = {int(p): k for k, p in enumerate(index)}
        corrupted = np.array([pos[int(c)] for c in self.corrupted if int(c) in pos], dtype=np.int64)
        return replace(
            self,
            x=self.x[index],
            y=self.y[index],
            example_ids=self.example_ids[index],
            clean_y=None if self.clean_y is None else self.clean_y[index],
            corrupted=corrupted,
        )

    @property
    def is_noisy(self) -> np.ndarray:
        """``[N]`` bool: the label was changed by corruption."""
        mask = np.zeros(len(self), dtype=bool)
        mask[self.corrupted] = True
        return mask


def validate(x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Raise :class:`DataError` for empty data, mismatched lengths, or bad labels."""
    if x.ndim == 0 or len(x) == 0:
        raise DataError("the data set is empty (no examples)")
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"features and labels have different lengths: {len(x)} vs {len(y)}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            pass
        else:
            raise DataError(f"labels must be integers, got dtype {y.dtype}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{int(bad.sum())} label(s) out of range [0, {num_classes}); e.g. position {first} "
            f"has label {y[first]}. Labels must be 0..num_classes-1."
        )
    if not np.all(np.isfinite(x)):
        raise DataError("features hold NaN or inf")


# ---------------------------------------------------------------- built-in data

def load_digits(*, n_train: int = 1400, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1797 examples, 10 classes), scaled to [0, 1].

    Shuffled with ``seed``; the first ``n_train`` examples train, the rest test.
    Returns ``(train, test)`` with ``x`` of shape ``[N, 64]``.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    if not 0 < n_train < len(y):
        raise DataError(f"n_train must be in (0, {len(y)}), got {n_train}")
    tr, te = order[:n_train], order[n_train:]
    make = lambda idx: Dataset(x[idx], y[idx], 10, example_ids=idx, name="digits", shape=(8, 8))
    return make(tr), make(te)


def load_mnist1d(*, num_samples: int = 5000, seed: int = 42) -> tuple[Dataset, Dataset]:
    """MNIST-1D generated locally by the ``mnist1d`` package (never downloaded).

    ``num_samples`` examples of length 40 in 10 classes, split 80/20 into
    ``(train, test)`` by the generator.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    d = make_dataset(args)
    xtr, ytr = np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int64)
    xte, yte = np.asarray(d["x_test"], np.float32), np.asarray(d["y_test"], np.int64)
    train = Dataset(xtr, ytr, 10, name="mnist1d", shape=(xtr.shape[1],))
    test = Dataset(xte, yte, 10, example_ids=np.arange(len(yte)) + len(ytr), name="mnist1d",
                   shape=(xte.shape[1],))
    return train, test


# ---------------------------------------------------------------- user files

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


# ---------------------------------------------------------------- label corruption

def _with_labels(data: Dataset, new_y: np.ndarray) -> Dataset:
    out = copy.copy(data)
    out.clean_y = data.y.copy() if data.clean_y is None else data.clean_y
    out.y = new_y.astype(np.int64)
    out.corrupted = np.flatnonzero(out.y != out.clean_y).astype(np.int64)
    return out


def symmetric_noise(data: Dataset, rate: float, *, seed: int = 0) -> Dataset:
    """Flip a ``rate`` fraction of labels, each to a different class drawn uniformly.

    Exactly ``round(rate * N)`` examples (chosen at random) get a wrong label.
    """
    if not 0 <= rate <= 1:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    if data.num_classes < 2:
        raise DataError("label noise needs at least 2 classes")
    rng = np.random.default_rng(seed)
    n = len(data)
    idx = rng.choice(n, size=int(round(rate * n)), replace=False)
    y = data.y.copy()
    shift = rng.integers(1, data.num_classes, size=len(idx))
    y[idx] = (y[idx] + shift) % data.num_classes
    return _with_labels(data, y)


def asymmetric_noise(
    data: Dataset, rate: float, *, pairs: dict[int, int] | None = None, seed: int = 0
) -> Dataset:
    """Class-pair noise: a ``rate`` fraction of each source class is relabelled to its
    pair class. Default pairs: ``c -> (c + 1) % num_classes``."""
    if not 0 <= rate <= 1:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    k = data.num_classes
    pairs = pairs if pairs is not None else {c: (c + 1) % k for c in range(k)}
    for a, b in pairs.items():
        if not (0 <= a < k and 0 <= b < k) or a == b:
            raise DataError(f"bad class pair {a} -> {b} for {k} classes")
    rng = np.random.default_rng(seed)
    y = data.y.copy()
    for a, b in pairs.items():
        members = np.flatnonzero(data.y == a)
        chosen = rng.choice(members, size=int(round(rate * len(members))), replace=False)
        y[chosen] = b
    return _with_labels(data, y)


def random_labels(data: Dataset, *, seed: int = 0) -> Dataset:
    """Replace every label by one drawn uniformly from all classes (Zhang et al. 2017)."""
    rng = np.random.default_rng(seed)
    return _with_labels(data, rng.integers(0, data.num_classes, size=len(data)))


def corrupt(data: Dataset, kind: str, rate: float = 0.0, *, seed: int = 0) -> Dataset:
    """Dispatch: ``kind`` in ``none``, ``symmetric``, ``asymmetric``, ``random``."""
    if kind in ("none", "", None) or (kind != "random" and rate == 0):
        return data
    if kind == "symmetric":
        return symmetric_noise(data, rate, seed=seed)
    if kind == "asymmetric":
        return asymmetric_noise(data, rate, seed=seed)
    if kind == "random":
        return random_labels(data, seed=seed)
    raise DataError(f"unknown label noise '{kind}': use none, symmetric, asymmetric or random")
