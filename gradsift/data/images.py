"""Image folders: one sub-folder per class, PNG/JPEG files read with Pillow.

    root/cat/001.png  root/cat/002.jpg  root/dog/001.png ...

* :func:`image_folder`: a torch ``Dataset`` read lazily, items ``(image [C, H, W] float32 in
  [0, 1], class index)``, with your ``transform`` (augmentation) applied per item; for
  :func:`gradsift.fit`, :class:`gradsift.Sifter` or a ``DataLoader``.
* :func:`load_image_folder`: the same images in memory as a :class:`~gradsift.data.Dataset`
  split into train and test (what ``--dataset PATH`` on the CLI reads).

Class names are the sub-folder names in sorted order (``dataset.classes``). Every file is
checked when the folder is opened: a file Pillow cannot read is a
:class:`~gradsift.errors.DataError` naming it, or, with ``skip_corrupt=True``, skipped and
listed in ``dataset.skipped``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .dataset import Dataset, holdout

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "image_folder", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _scan(root: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    if not root.is_dir():
        raise DataError(f"no such folder: {root}")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; an image folder is root/<class>/<image>.png")
    files, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(k)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return files, labels, classes


def _read(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)  # [C, H, W]


class ImageFolder(torch.utils.data.Dataset):
    """A torch ``Dataset`` over an image folder (see the module docstring).

    Attributes:
        files: ``[N]`` image paths; targets: ``[N]`` class indices; classes: the names;
        skipped: ``(path, reason)`` of files skipped as unreadable.
    """

    def __init__(self, root: str | Path, *, transform: Callable[[Tensor], Tensor] | None = None,
                 mode: str = "L", size: tuple[int, int] | None = None, skip_corrupt: bool = False):
        from PIL import Image

        self.root, self.transform, self.mode, self.size = Path(root), transform, mode, size
        files, labels, self.classes = _scan(self.root)
        self.files, targets, self.skipped = [], [], []
        for f, k in zip(files, labels):
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:  # Pillow raises many types for a broken file
                reason = f"{type(e).__name__}: {e}"
                if not skip_corrupt:
                    raise DataError(f"cannot read image {f}: {reason}. Remove or fix it, or pass "
                                    "skip_corrupt=True to skip unreadable files (they are listed in "
                                    ".skipped)") from None
                self.skipped.append((str(f), reason))
                continue
            self.files.append(f)
            targets.append(k)
        if not self.files:
            raise DataError(f"{self.root}: no readable images")
        self.targets = torch.tensor(targets, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = torch.from_numpy(_read(self.files[i], self.mode, self.size))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


def image_folder(root: str | Path, *, transform: Callable[[Tensor], Tensor] | None = None,
                 mode: str = "L", size: tuple[int, int] | None = None,
                 skip_corrupt: bool = False) -> ImageFolder:
    """A lazily read image folder as a torch ``Dataset`` of ``(image [C, H, W], class)``.

    Args:
        root: the folder; one sub-folder per class.
        transform: applied to each image tensor when it is read (augmentation).
        mode: Pillow mode, ``"L"`` (grey, C = 1) or ``"RGB"`` (C = 3).
        size: ``(H, W)`` to resize every image to (default: as stored; then all images
            must have the same size to be batched).
        skip_corrupt: skip unreadable files (listed in ``.skipped``) instead of raising.
    """
    return ImageFolder(root, transform=transform, mode=mode, size=size, skip_corrupt=skip_corrupt)


def load_image_folder(root: str | Path, *, mode: str = "L", size: tuple[int, int] | None = None,
                      skip_corrupt: bool = False, test_fraction: float = 0.2,
                      seed: int = 0) -> tuple[Dataset, Dataset]:
    """An image folder in memory: ``x`` ``[N, C, H, W]`` in [0, 1], split into
    ``(train, test)`` (``test_fraction`` held out, shuffled with ``seed``); class names in
    ``.classes``. Skipped files (``skip_corrupt=True``) are listed in the train split's
    ``skipped`` attribute."""
    folder = image_folder(root, mode=mode, size=size, skip_corrupt=skip_corrupt)
    images = [_read(f, mode, size) for f in folder.files]
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise DataError(f"{root}: images have different sizes ({', '.join(str(s[1:]) for s in shapes[:4])}); "
                        "pass size=(H, W) to resize them")
    x = np.stack(images)
    data = Dataset(x, folder.targets.numpy(), len(folder.classes), name=Path(root).name,
                   shape=tuple(x.shape[1:]), classes=folder.classes)
    train, test = holdout(data, test_fraction, seed)
    train.skipped = list(folder.skipped)  # type: ignore[attr-defined]
    return train, test
