"""Data from user files: ``.npz``, CSV and Parquet tables, token sequences in Parquet, and
(:func:`gradsift.data.load` by name or path is in :mod:`.by_name`; image folders and
HuggingFace datasets are in :mod:`.images`, :mod:`.hf`).

Every loader checks its input before anything trains and raises
:class:`~gradsift.errors.DataError` naming the file, the place and the fix:

* labels are integers ``0..K-1`` or class names (mapped to indices in sorted order; the
  names are kept in :attr:`Dataset.classes`); ``1.7``, ``inf``, a mix of names and numbers,
  negative labels and labels that would mean more than :data:`MAX_CLASSES` classes are
  refused;
* features are real numbers (complex, object and string arrays are refused);
* a test split in the file (``x_test``) has the training features' dtype and shape;
* CSV: duplicate headers are refused and the encoding is explicit (``encoding=``).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from .dataset import MAX_CLASSES, Dataset, holdout


def _num_classes(*ys: np.ndarray) -> int:
    return int(max(int(np.max(y)) for y in ys if len(y)) + 1)


# ---------------------------------------------------------------- labels

def _as_number(v: Any) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def encode_labels(values: Sequence[Any] | np.ndarray, *, where: str = "labels",
                  classes: Sequence[str] | None = None, row_offset: int = 0,
                  row_name: str = "row") -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Labels -> ``(y [N] int64, class names or None)``.

    Integers (``3``, ``"3"``, ``3.0``) stay as they are; class names (``"cat"``) are
    mapped to indices in sorted order (or in the order of ``classes`` when given, e.g. the
    training split's names for a test split).

    Raises:
        DataError: a non-integer or non-finite number, a mix of names and numbers, a
            negative label, a label meaning more than :data:`MAX_CLASSES` classes, or a
            name not in ``classes``.
    """
    arr = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be one value per example, got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        y = arr.astype(np.int64)
        _check_range(y, where, row_offset, row_name)
        return y, None
    if arr.dtype.kind == "c":
        raise DataError(f"{where}: labels are complex numbers; use integers or class names")
    nums = [_as_number(v) for v in arr.tolist()]
    is_num = np.array([n is not None for n in nums], dtype=bool)
    if classes is not None and not is_num.all():
        lookup = {c: k for k, c in enumerate(classes)}
        y = np.empty(len(arr), np.int64)
        for i, v in enumerate(arr.tolist()):
            if str(v) not in lookup:
                raise DataError(f"{where}, {row_name} {i + row_offset}: class '{v}' is not one of the training "
                                f"classes ({', '.join(list(classes)[:10])})")
            y[i] = lookup[str(v)]
        return y, tuple(classes)
    if is_num.all():
        f = np.array(nums, dtype=np.float64)
        bad = ~np.isfinite(f)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}, {row_name} {i + row_offset}: label {arr[i]!r} is not a finite number; "
                            "labels must be integers 0..K-1 or class names")
        frac = f != np.round(f)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise DataError(f"{where}, {row_name} {i + row_offset}: label {arr[i]!r} is not an integer; labels "
                            "must be integers 0..K-1 or class names")
        if np.abs(f).max(initial=0) >= 2**62:
            i = int(np.argmax(np.abs(f)))
            raise DataError(f"{where}, {row_name} {i + row_offset}: label {arr[i]!r} is far too large; labels "
                            f"must be integers 0..K-1 with K <= {MAX_CLASSES}")
        y = f.astype(np.int64)
        _check_range(y, where, row_offset, row_name)
        return y, None
    if is_num.any():
        i_num, i_name = int(np.flatnonzero(is_num)[0]), int(np.flatnonzero(~is_num)[0])
        raise DataError(
            f"{where}: labels mix numbers and class names (e.g. {arr[i_num]!r} at {row_name} "
            f"{i_num + row_offset} and {arr[i_name]!r} at {row_name} {i_name + row_offset}); use one or the other"
        )
    names = [str(v) for v in arr.tolist()]
    uniq = sorted(set(names))
    if len(uniq) > MAX_CLASSES:
        raise DataError(f"{where}: {len(uniq)} distinct class names; at most {MAX_CLASSES} classes are supported")
    lookup = {c: k for k, c in enumerate(uniq)}
    return np.array([lookup[n] for n in names], dtype=np.int64), tuple(uniq)


def _check_range(y: np.ndarray, where: str, row_offset: int, row_name: str) -> None:
    if len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{where}, {row_name} {i + row_offset}: label {y[i]} is negative; labels must be 0..K-1")
    if len(y) and y.max() >= MAX_CLASSES:
        i = int(np.argmax(y))
        raise DataError(
            f"{where}, {row_name} {i + row_offset}: label {y[i]} would mean {int(y[i]) + 1} classes; labels must be "
            f"0..K-1 with K <= {MAX_CLASSES} (class names are mapped to indices for you)"
        )


def _check_features(x: np.ndarray, where: str) -> None:
    if x.dtype.kind == "c":
        raise DataError(f"{where}: features are complex numbers; gradsift trains on real features "
                        "(split real and imaginary parts into separate features)")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: features have dtype {x.dtype}; they must be numbers (bool, int or float)")
    if x.ndim < 2:
        raise DataError(f"{where}: features must be [N, ...] with one row per example, got shape {x.shape}")


def _kind(dtype: np.dtype) -> str:
    return "float" if dtype.kind == "f" else "integer"


# ---------------------------------------------------------------- npz

def load_npz(
    path: str | Path, *, x_key: str = "x", y_key: str = "y", test_fraction: float = 0.2,
    seed: int = 0, num_classes: int | None = None,
) -> tuple[Dataset, Dataset]:
    """Load ``x`` ``[N, ...]`` / ``y`` ``[N]`` arrays from an ``.npz`` file.

    Labels may be integers or class names (strings). If the file also holds
    ``x_test``/``y_test`` they form the test split (same dtype kind and example shape as
    ``x``); otherwise ``test_fraction`` of the examples are held out (shuffled with ``seed``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise DataError(f"{path} is not a readable .npz file ({'empty' if size == 0 else 'not a zip archive'}); "
                        "write it with np.savez(path, x=..., y=...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            for k in (x_key, y_key):
                if k not in keys:
                    raise DataError(f"{path} has no array '{k}' (it has: {', '.join(sorted(keys)) or 'none'})")
            has_test = {"x_test", "y_test"} <= keys
            arrays = {k: f[k] for k in ([x_key, y_key] + (["x_test", "y_test"] if has_test else []))}
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DataError(f"{path} holds object arrays (pickled Python objects); save numeric arrays "
                            "(np.savez(path, x=float_array, y=int_array))") from None
        raise DataError(f"{path} is not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(arrays[x_key], np.ndarray) or not hasattr(arrays[x_key], "dtype"):
        raise DataError(f"{path}: '{x_key}' is not an array")
    x, y = arrays[x_key], arrays[y_key]
    where = f"{path} '{x_key}'"
    _check_features(x, where)
    _precheck(x, y)
    y, classes = encode_labels(y, where=f"{path} '{y_key}'", row_name="index")
    if has_test:
        xt, yt = arrays["x_test"], arrays["y_test"]
        _check_features(xt, f"{path} 'x_test'")
        if xt.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: 'x_test' examples have shape {xt.shape[1:]} but '{x_key}' examples have "
                            f"{x.shape[1:]}; both splits need the same features")
        if _kind(xt.dtype) != _kind(x.dtype):
            raise DataError(f"{path}: 'x_test' has dtype {xt.dtype} but '{x_key}' has {x.dtype}; save both "
                            "splits with the same dtype")
        _precheck(xt, yt)
        yt, _ = encode_labels(yt, where=f"{path} 'y_test'", classes=classes, row_name="index")
    else:
        xt = yt = None
    k = _resolve_num_classes(num_classes, classes, y, *(() if yt is None else (yt,)), where=str(path))
    shape = tuple(x.shape[1:]) if x.ndim > 1 else None
    full = Dataset(x, y, k, name=path.stem, shape=shape, classes=classes)
    if has_test:
        test = Dataset(xt, yt, k, example_ids=np.arange(len(yt)) + len(y), name=path.stem, shape=shape,
                       classes=classes)
        return full, test
    return holdout(full, test_fraction, seed)


def _resolve_num_classes(num_classes: int | None, classes: Sequence[str] | None, *ys: np.ndarray,
                         where: str) -> int:
    k = len(classes) if classes is not None else _num_classes(*ys)
    if num_classes is not None:
        if not 1 <= int(num_classes) <= MAX_CLASSES:
            raise DataError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
        if int(num_classes) < k:
            raise DataError(f"{where}: num_classes={num_classes} but the labels need {k}")
        return int(num_classes)
    return k


def _precheck(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim == 0 or y.ndim == 0 or len(x) == 0 or len(y) == 0:
        raise DataError("the data set is empty (no examples)")
    if len(x) != len(y):
        raise DataError(f"features and labels have different lengths: {len(x)} vs {len(y)}")


# ---------------------------------------------------------------- CSV

def _read_csv_rows(path: Path, encoding: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        with path.open(newline="", encoding=enc) as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path} is empty") from None
            rows = [(row_no, row) for row_no, row in enumerate(reader, start=2) if row]
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid {encoding} text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
            "pass its encoding, e.g. encoding='latin-1' (CLI: --encoding latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"unknown encoding '{encoding}'") from None
    except csv.Error as e:
        raise DataError(f"{path} is not a readable CSV file ({e})") from None
    return header, rows


def load_csv(
    path: str | Path, *, label_column: str = "label", test_fraction: float = 0.2, seed: int = 0,
    num_classes: int | None = None, encoding: str = "utf-8",
) -> tuple[Dataset, Dataset]:
    """Load a CSV with a header: numeric feature columns and one label column (integers or
    class names). ``encoding`` is the text encoding of the file (default UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    header, rows = _read_csv_rows(path, encoding)
    header = [h.strip() for h in header]
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise DataError(f"{path}: duplicate column name(s) {', '.join(repr(d) for d in dups)}; every column "
                        "needs its own name")
    if label_column not in header:
        raise DataError(
            f"{path} has no column '{label_column}' (columns: {', '.join(header)}); "
            "pass label_column=... (CLI: --label-column NAME)"
        )
    if len(header) < 2:
        raise DataError(f"{path} has only the label column '{label_column}'; it needs feature columns too")
    li = header.index(label_column)
    xs, labels = [], []
    for row_no, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path}:{row_no}: {len(row)} fields, header has {len(header)}")
        try:
            xs.append([float(v) for j, v in enumerate(row) if j != li])
        except ValueError as e:
            raise DataError(f"{path}:{row_no}: a feature is not a number ({e})") from None
        labels.append(row[li].strip())
    if not xs:
        raise DataError(f"{path} has a header but no examples")
    y, classes = encode_labels(labels, where=f"{path} column '{label_column}'", row_offset=2, row_name="line")
    x = np.asarray(xs, np.float64)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}:{int(bad[0]) + 2}: feature {x[tuple(bad)]} is not finite")
    x = x.astype(np.float32)
    _precheck(x, y)
    k = _resolve_num_classes(num_classes, classes, y, where=str(path))
    return holdout(Dataset(x, y, k, name=path.stem, shape=(x.shape[1],), classes=classes), test_fraction, seed)


# ---------------------------------------------------------------- Parquet

def load_parquet(
    path: str | Path, *, label_column: str = "label", test_fraction: float = 0.2, seed: int = 0,
    num_classes: int | None = None, pad_id: int = 0,
) -> tuple[Dataset, Dataset]:
    """Load a Parquet table: numeric feature columns and one label column (integers or
    class names); or one column of token-id sequences (lists of ints) and the label column,
    giving ``x`` ``[N, L]`` int64 padded with ``pad_id`` to the longest sequence
    (``Dataset.token_ids`` is then true)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file: {path}")
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    data = table_dataset(frame, str(path), label_column=label_column, num_classes=num_classes, pad_id=pad_id,
                         name=path.stem)
    return holdout(data, test_fraction, seed)


def table_dataset(frame: Any, where: str, *, label_column: str = "label", num_classes: int | None = None,
                  pad_id: int = 0, name: str = "data") -> Dataset:
    """A :class:`Dataset` from a table (a pandas ``DataFrame``, e.g. a Parquet file's): numeric
    feature columns and the label column; or token-id sequences (lists of ints) in one
    column, or in ``input_ids`` beside other list columns (``attention_mask``,
    ``token_type_ids``: the padding is the mask), giving ``x`` ``[N, L]`` int64 padded with
    ``pad_id``. ``where`` names the source in errors."""
    path = where
    cols = [str(c) for c in frame.columns]
    if len(set(cols)) != len(cols):
        raise DataError(f"{path}: duplicate column names")
    if label_column not in cols:
        raise DataError(f"{path} has no column '{label_column}' (columns: {', '.join(cols)}); pass "
                        "label_column=... (CLI: --label-column NAME)")
    features = [c for c in frame.columns if str(c) != label_column]
    if not features:
        raise DataError(f"{path} has only the label column '{label_column}'; it needs feature columns too")
    if len(frame) == 0:
        raise DataError(f"{path} has no rows")
    y, classes = encode_labels(frame[label_column].to_numpy(), where=f"{path} column '{label_column}'")
    token_ids = False
    lists = [c for c in features if isinstance(frame[c].iloc[0], (list, tuple, np.ndarray))]
    if lists and (len(features) == 1 or "input_ids" in lists):
        col = features[0] if len(features) == 1 else "input_ids"
        x = _pad_tokens(frame[col].tolist(), pad_id, f"{path} column '{col}'")
        token_ids = True
    else:
        bad = [str(c) for c in features if frame[c].dtype.kind not in "biuf"]
        if bad:
            raise DataError(f"{path}: column(s) {', '.join(bad)} are not numeric; features must be numbers "
                            "(or token-id lists: one column, or 'input_ids')")
        x = frame[features].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{path}: features hold NaN or inf")
        x = x.astype(np.float32)
    k = _resolve_num_classes(num_classes, classes, y, where=str(path))
    return Dataset(x, y, k, name=name, shape=(x.shape[1],), classes=classes, token_ids=token_ids)


def _pad_tokens(seqs: list[Any], pad_id: int, where: str) -> np.ndarray:
    arrs = []
    for i, s in enumerate(seqs):
        a = np.asarray(s)
        if a.ndim != 1 or (len(a) and a.dtype.kind not in "iu"):
            raise DataError(f"{where}, row {i}: a token sequence must be a list of integer ids, got {a.dtype} "
                            f"of shape {a.shape}")
        if len(a) and a.min() < 0:
            raise DataError(f"{where}, row {i}: token ids must be >= 0")
        arrs.append(a.astype(np.int64))
    length = max((len(a) for a in arrs), default=0)
    if length == 0:
        raise DataError(f"{where}: every token sequence is empty")
    out = np.full((len(arrs), length), pad_id, dtype=np.int64)
    for i, a in enumerate(arrs):
        out[i, : len(a)] = a
    return out


__all__ = ["MAX_CLASSES", "encode_labels", "load_csv", "load_npz", "load_parquet", "table_dataset"]
