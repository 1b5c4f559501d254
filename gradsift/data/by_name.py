"""A data set by name or path: :func:`load` (built-in data, files, image folders and
HuggingFace datasets from local files)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .builtin import BUILTIN, load_digits, load_mnist1d
from .dataset import Dataset
from .files import load_csv, load_npz, load_parquet
from .hf import is_hf_source, load_hf_table

__all__ = ["load"]


def load(name_or_path: str, *, seed: int = 0, label_column: str = "label", encoding: str = "utf-8",
         **kwargs) -> tuple[Dataset, Dataset]:
    """Load a built-in data set by name (``digits``, ``mnist1d``), a ``.npz``, ``.csv`` or
    ``.parquet`` file, an image folder (one sub-folder per class), or a HuggingFace data set
    from local files: a ``save_to_disk`` directory or a ``.json``/``.jsonl`` file
    (:func:`gradsift.data.hf.load_hf_table`).

    ``label_column`` names the label column of a CSV or Parquet table and ``encoding`` the
    text encoding of a CSV; giving them for other sources is an error."""
    path = Path(name_or_path)
    hf = is_hf_source(path) or path.suffix.lower() in (".json", ".jsonl")
    if label_column != "label" and path.suffix not in (".csv", ".parquet") and not hf:
        raise DataError(f"label_column (--label-column) applies to CSV and Parquet tables, not '{name_or_path}'")
    if encoding.lower() not in ("utf-8", "utf8") and path.suffix != ".csv":
        raise DataError(f"encoding (--encoding) applies to CSV files, not '{name_or_path}'")
    if name_or_path == "digits":
        return load_digits(seed=seed, **kwargs)
    if name_or_path == "mnist1d":
        return load_mnist1d(**kwargs)
    if hf:
        return load_hf_table(path, seed=seed, label_column=label_column, **kwargs)
    if path.suffix == ".npz":
        return load_npz(path, seed=seed, **kwargs)
    if path.suffix == ".csv":
        return load_csv(path, seed=seed, label_column=label_column, encoding=encoding, **kwargs)
    if path.suffix == ".parquet":
        return load_parquet(path, seed=seed, label_column=label_column, **kwargs)
    if path.is_dir():
        from .images import load_image_folder

        return load_image_folder(path, seed=seed, **kwargs)
    raise DataError(
        f"unknown data set '{name_or_path}': use one of {', '.join(BUILTIN)}, a path to a "
        ".npz, .csv, .parquet or .json/.jsonl file, an image folder, or a directory written by "
        "datasets' save_to_disk"
    )
