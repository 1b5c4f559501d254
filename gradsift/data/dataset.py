"""The in-memory labelled data set, :class:`Dataset`, and its checks.

Every example carries a stable integer ``example_id`` (its row in the source file or
generator output) so that scores and label issues can be joined back to the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import DataError


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
