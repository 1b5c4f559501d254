"""The in-memory labelled data set, :class:`Dataset`, and its checks.

Every example carries a stable integer ``example_id`` (its row in the source file or
generator output) so that scores and label issues can be joined back to the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import DataError

#: labels must mean at most this many classes (a label of 1e9 is a mistake, not a class)
MAX_CLASSES = 100_000


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
        classes: the class names when labels were names (``classes[y]`` is the name),
            else ``None``.
        token_ids: ``x`` holds int64 token ids ``[N, L]`` (kept as integers), not features.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    example_ids: np.ndarray = None  # type: ignore[assignment]
    name: str = "data"
    shape: tuple[int, ...] | None = None
    clean_y: np.ndarray | None = None
    corrupted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    classes: tuple[str, ...] | None = None
    token_ids: bool = False

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.dtype.kind not in "biuf":
            raise DataError(f"features have dtype {x.dtype}; they must be real numbers (bool, int or float)")
        self.x = x.astype(np.int64 if self.token_ids else np.float32, copy=False)
        if self.classes is not None:
            self.classes = tuple(str(c) for c in self.classes)
            if len(self.classes) > self.num_classes:
                raise DataError(f"{len(self.classes)} class names for num_classes={self.num_classes}")
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
        """``(x [N, ...] float32 (int64 token ids), y [N] int64)`` as torch tensors."""
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


def holdout(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``data`` into ``(train, test)``: ``test_fraction`` of the examples (at least
    one), chosen by a permutation seeded with ``seed``; both keep position order."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = max(1, int(round(test_fraction * len(data))))
    if n_test >= len(data):
        raise DataError(f"too few examples ({len(data)}) to hold out a test split")
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


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
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{int(bad.sum())} label(s) out of range [0, {num_classes}); e.g. position {first} "
            f"has label {y[first]}. Labels must be 0..num_classes-1."
        )
    if not np.all(np.isfinite(x)):
        raise DataError("features hold NaN or inf")
