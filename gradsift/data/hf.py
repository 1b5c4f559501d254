"""HuggingFace ``datasets`` from local files.

Sources (never the network): a directory written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``, or a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file
read by ``datasets``.

* :func:`load_hf` -> :class:`HFExamples`, a torch ``Dataset`` of ``(inputs, label)``
  items with ``inputs`` a dict of tensors (``input_ids [L]``, ``attention_mask [L]``, ...),
  for :func:`gradsift.fit` and :class:`gradsift.Sifter` (a HF model is called as
  ``model(**inputs)``); :func:`hf_examples` wraps a ``datasets.Dataset`` already loaded.
* :func:`load_hf_table` -> ``(train, test)`` in memory (:class:`~gradsift.data.Dataset`),
  what the CLI's ``--dataset`` takes: numeric columns as features, or token ids
  (``input_ids``) padded.

Labels are integers, a ``ClassLabel`` (its names are kept) or class names (mapped to
indices in sorted order, names kept in :attr:`HFExamples.classes`). Anything malformed
raises :class:`~gradsift.errors.DataError` naming the file, the column and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .dataset import Dataset, holdout
from .files import encode_labels, table_dataset

__all__ = ["HF_SUFFIXES", "HFExamples", "hf_examples", "is_hf_source", "load_hf", "load_hf_table", "read_hf"]

#: file suffixes read through ``datasets`` (a ``save_to_disk`` directory is the other source)
HF_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("HuggingFace datasets need the 'datasets' package: pip install datasets") from None
    return datasets


def is_hf_source(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``save_to_disk`` (a ``Dataset`` or a
    ``DatasetDict``)."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def read_hf(path: str | Path) -> dict[str, Any]:
    """The splits of a local HuggingFace data set: ``{split name: datasets.Dataset}``
    (``{"train": ...}`` for a single ``Dataset`` or a file).

    Raises:
        DataError: no such path; a directory not written by ``save_to_disk``; a file
            ``datasets`` cannot read (its message is kept); an empty data set.
    """
    datasets = _datasets()
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file or directory: {p}")
    if p.is_dir():
        if not is_hf_source(p):
            raise DataError(f"{p} is not a directory written by datasets' save_to_disk (no dataset_dict.json "
                            "or dataset_info.json in it); save it with ds.save_to_disk(path), or pass a "
                            f"{'/'.join(HF_SUFFIXES)} file")
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types
            raise DataError(f"{p}: datasets cannot load it ({type(e).__name__}: {e})") from None
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    else:
        fmt = _FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"{p}: a HuggingFace data set is a save_to_disk directory or a "
                            f"{', '.join(HF_SUFFIXES)} file, not '{p.suffix}'")
        try:
            splits = {"train": datasets.load_dataset(fmt, data_files=str(p), split="train")}
        except Exception as e:  # noqa: BLE001
            cause = e.__cause__ or e
            raise DataError(f"{p} is not a readable {fmt} data set ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    for name, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"{p}: split '{name}' has no rows")
    return splits


def _split(splits: dict[str, Any], split: str, where: Path) -> Any:
    if split not in splits:
        raise DataError(f"{where} has no split '{split}' (splits: {', '.join(splits)}); pass split=...")
    return splits[split]


def _labels(ds: Any, label_column: str, where: str) -> tuple[np.ndarray, tuple[str, ...] | None]:
    if label_column not in ds.column_names:
        raise DataError(f"{where} has no column '{label_column}' (columns: {', '.join(ds.column_names)}); pass "
                        "label_column=... (CLI: --label-column NAME)")
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)  # a ClassLabel
    y, classes = encode_labels(np.asarray(ds[label_column], dtype=object), where=f"{where} column '{label_column}'")
    return y, (tuple(names) if names else classes)


def _numeric(feature: Any) -> bool:
    """A feature of numbers or (nested) sequences of numbers."""
    dtype = getattr(feature, "dtype", None)
    if dtype is not None and not hasattr(feature, "feature"):
        return dtype.startswith(("int", "uint", "float", "bool"))
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, (list, tuple)) and feature:
        inner = feature[0]
    return inner is not None and _numeric(inner)


class HFExamples(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` as a torch ``Dataset`` of ``(inputs, label)`` items:
    ``inputs`` is ``{column: tensor}`` over :attr:`input_columns` (``input_ids [L]`` etc.,
    equal length in every row), ``label`` an ``int`` in ``[0, num_classes)``.

    Attributes:
        dataset: the ``datasets.Dataset``.
        input_columns: the columns given to the model (default: every numeric column but
            the label; text columns are left out -- tokenize them first).
        targets: ``[N]`` int64 labels. classes: class names (``ClassLabel`` names or the
            names in the label column), or ``None``.
    """

    def __init__(self, dataset: Any, *, label_column: str = "label",
                 input_columns: Sequence[str] | None = None, where: str = "the data set"):
        self.dataset, self.label_column, self.where = dataset, label_column, where
        y, self.classes = _labels(dataset, label_column, where)
        self.targets = torch.from_numpy(y)
        self.num_classes = len(self.classes) if self.classes else int(y.max()) + 1
        others = [c for c in dataset.column_names if c != label_column]
        if input_columns is None:
            input_columns = [c for c in others if _numeric(dataset.features[c])]
            if not input_columns:
                raise DataError(f"{where}: no numeric input column (columns: {', '.join(others) or 'none'}); "
                                "tokenize text first (ds.map(tokenizer, batched=True)) and save the result")
        for c in input_columns:
            if c not in others:
                raise DataError(f"{where}: input column '{c}' is not in the data set (columns: "
                                f"{', '.join(others)})")
            if not _numeric(dataset.features[c]):
                raise DataError(f"{where}: column '{c}' holds {dataset.features[c]}, not numbers; tokenize "
                                "it first, or leave it out of input_columns")
        self.input_columns = list(input_columns)
        for c in self.input_columns:
            lengths = {len(v) for v in dataset[c]} if not hasattr(dataset.features[c], "dtype") else set()
            if len(lengths) > 1:
                raise DataError(f"{where}: column '{c}' holds sequences of different lengths ({min(lengths)} to "
                                f"{max(lengths)}); pad them when tokenizing (padding='max_length') so every "
                                "batch stacks")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        row = self.dataset[int(i)]
        return {c: torch.as_tensor(row[c]) for c in self.input_columns}, int(self.targets[i])


def hf_examples(dataset: Any, *, label_column: str = "label", input_columns: Sequence[str] | None = None) -> HFExamples:
    """A ``datasets.Dataset`` already loaded as :class:`HFExamples`."""
    return HFExamples(dataset, label_column=label_column, input_columns=input_columns)


def load_hf(path: str | Path, *, split: str = "train", label_column: str = "label",
            input_columns: Sequence[str] | None = None) -> HFExamples:
    """A local HuggingFace data set (see :func:`read_hf`) as a torch ``Dataset`` of
    ``(inputs dict, label)`` items, for :func:`gradsift.fit` and :class:`gradsift.Sifter`::

        train = gs.data.load_hf("data/tokenized", split="train")      # save_to_disk directory
        gs.fit(LogitsModel(bert), train, loss_fn=gs.losses.cross_entropy, aggregator="m3")
    """
    splits = read_hf(path)
    where = f"{path}" + (f" (split '{split}')" if len(splits) > 1 else "")
    return HFExamples(_split(splits, split, Path(path)), label_column=label_column,
                      input_columns=input_columns, where=where)


def load_hf_table(path: str | Path, *, label_column: str = "label", test_fraction: float = 0.2, seed: int = 0,
                  num_classes: int | None = None, pad_id: int = 0) -> tuple[Dataset, Dataset]:
    """A local HuggingFace data set in memory as ``(train, test)`` (the CLI's
    ``--dataset``): numeric columns as features, or token ids (one list column, or
    ``input_ids``) padded with ``pad_id``; see :func:`~gradsift.data.files.table_dataset`.
    Its ``train`` and ``test`` splits when it has both, else ``test_fraction`` held out
    of ``train`` (seeded)."""
    import pandas as pd

    p = Path(path)
    splits = read_hf(p)
    train = _split(splits, "train", p)
    test = splits.get("test")
    parts = [train] if test is None else [train, test]
    for part in parts:
        _labels(part, label_column, str(p))  # names the file and column on a bad label column
    names = getattr(train.features[label_column], "names", None)
    data = table_dataset(pd.concat([part.to_pandas() for part in parts], ignore_index=True), str(p),
                         label_column=label_column, num_classes=num_classes or (len(names) if names else None),
                         pad_id=pad_id, name=p.stem or p.name)
    if names:  # a ClassLabel: integer labels, its names kept
        data.classes = tuple(names)
    if test is None:
        return holdout(data, test_fraction, seed)
    n = len(train)
    return data.subset(np.arange(n)), data.subset(np.arange(n, len(data)))
