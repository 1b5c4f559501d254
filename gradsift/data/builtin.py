"""Built-in data sets; they never touch the network: scikit-learn's ``digits`` ships
inside scikit-learn, and MNIST-1D is generated locally with the ``mnist1d`` package."""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .dataset import Dataset

BUILTIN = ("digits", "mnist1d")


def load_digits(*, n_train: int = 1400, seed: int = 0, images: bool = False) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1797 examples, 10 classes), scaled to [0, 1].

    Shuffled with ``seed``; the first ``n_train`` examples train, the rest test.
    Returns ``(train, test)`` with ``x`` of shape ``[N, 64]`` (``images=True``: images
    ``[N, 1, 8, 8]`` for CNNs; ``mlp`` flattens either).
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    if not 0 < n_train < len(y):
        raise DataError(f"n_train must be in (0, {len(y)}), got {n_train}")
    tr, te = order[:n_train], order[n_train:]
    if images:
        x = x.reshape(-1, 1, 8, 8)
    shape = (1, 8, 8) if images else (8, 8)
    make = lambda idx: Dataset(x[idx], y[idx], 10, example_ids=idx, name="digits", shape=shape)
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
