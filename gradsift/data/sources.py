"""Training data from anywhere: a :class:`~gradsift.data.Dataset`, a torch ``Dataset`` of
``(inputs, target)`` items, or a ``DataLoader``; batches keyed by example ids.

    train = gs.data.indexed(torch_dataset)    # items (example_id, inputs, target)
    loader = DataLoader(train, batch_size=128, shuffle=True)
    for ids, x, y in loader: ...

:func:`examples` wraps any of the three in :class:`Examples`, which is what
:func:`gradsift.fit` and :class:`gradsift.Sifter` read: the number of examples, their ids
``[N]``, batches ``(positions [B], ids [B], inputs, targets [B])`` per epoch, and sequential
batches for whole-data-set passes (evaluation), streamed so nothing is held in memory
that was not already there. Inputs may be tensors, tuples or dicts of tensors;
:func:`to_device` moves any of them.

Item forms: ``(inputs, target)`` (the example id is the item's position) or
``(example_id, inputs, target)`` with an integer id. Anything else is a
:class:`~gradsift.errors.DataError` naming the item and the expected form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_collate

from ..errors import DataError
from .dataset import Dataset

__all__ = ["indexed", "IndexedDataset", "examples", "Examples", "to_device", "split_item",
           "collate", "batch_size_of"]

FORMS = "(inputs, target) or (example_id, inputs, target)"


def _is_int_id(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, Tensor) and v.ndim == 0 and not v.is_floating_point() and not v.is_complex()


def _describe(item: Any) -> str:
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}: ({', '.join(type(v).__name__ for v in item)})"
    return f"a {type(item).__name__}"


def split_item(item: Any, where: Any = None) -> tuple[int | None, Any, Any]:
    """``item`` -> ``(example_id or None, inputs, target)``.

    Raises:
        DataError: the item is not ``(inputs, target)`` or ``(example_id, inputs, target)``.
    """
    at = "" if where is None else f" {where}"
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return None, item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 3:
        if not _is_int_id(item[0]):
            raise DataError(
                f"item{at} is {_describe(item)}; a 3-item must be (example_id, inputs, target) with "
                f"an integer example_id. For several inputs, return ((x1, x2), target) or a dict."
            )
        return int(item[0]), item[1], item[2]
    raise DataError(f"item{at} is {_describe(item)}; expected {FORMS}")


def collate(items: list[Any], positions: list[int] | None = None) -> tuple[Tensor | None, Any, Tensor]:
    """Items -> ``(ids [B] or None, inputs, targets [B, ...])`` with ``default_collate``
    (tensors, numbers, tuples and dicts of them). Ids are ``None`` for ``(inputs, target)``
    items unless ``positions`` gives them."""
    parts = [split_item(it, f"at position {p}" if positions else None)
             for it, p in zip(items, positions or [None] * len(items))]
    kinds = {p[0] is None for p in parts}
    if len(kinds) > 1:
        raise DataError(f"a batch mixes {FORMS} items; give every item the same form")
    if parts and parts[0][0] is not None:
        ids = torch.tensor([p[0] for p in parts], dtype=torch.int64)
    elif positions is not None:
        ids = torch.as_tensor(positions, dtype=torch.int64)
    else:
        ids = None
    inputs = default_collate([p[1] for p in parts])
    targets = default_collate([p[2] for p in parts])
    return ids, inputs, torch.as_tensor(targets)


def to_device(obj: Any, device: torch.device | str | None, *, non_blocking: bool = False) -> Any:
    """Move a tensor, or the tensors in a tuple / list / dict, to ``device`` (``None``: as is)."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(to_device(v, device, non_blocking=non_blocking) for v in obj)
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking=non_blocking) for v in obj]
    return obj


def batch_size_of(inputs: Any, targets: Any = None) -> int:
    """``B`` of a batch: the leading size of ``targets`` (or of the first tensor in ``inputs``)."""
    if isinstance(targets, Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    vals = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in vals:
        return batch_size_of(v)
    raise DataError("cannot tell the batch size: no tensor in the batch")


def index_inputs(inputs: Any, index: Tensor) -> Any:
    """Rows ``index`` of a batch of inputs (tensor, tuple or dict of ``[B, ...]`` tensors)."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: index_inputs(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(index_inputs(v, index) for v in inputs)
    return inputs


# ---------------------------------------------------------------- indexed

class IndexedDataset(TorchDataset):
    """A torch ``Dataset`` whose items are ``(example_id, inputs, target)``.

    Attributes:
        dataset: the wrapped data set (items ``(inputs, target)``).
        ids: ``[N]`` int64 example ids (default: positions ``0..N-1``).
    """

    def __init__(self, dataset: TorchDataset, ids: Any = None):
        self.dataset = dataset
        n = len(dataset)  # type: ignore[arg-type]
        self.ids = torch.arange(n) if ids is None else torch.as_tensor(np.asarray(ids), dtype=torch.int64)
        if len(self.ids) != n:
            raise DataError(f"indexed: {len(self.ids)} ids for {n} items")
        _check_unique(self.ids, "indexed")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        _, x, y = split_item(self.dataset[i], f"{i} of {type(self.dataset).__name__}")
        return int(self.ids[i]), x, y


def indexed(dataset: TorchDataset | Dataset, ids: Any = None) -> IndexedDataset:
    """Wrap a torch ``Dataset`` of ``(inputs, target)`` items (or a
    :class:`~gradsift.data.Dataset`) so that items are ``(example_id, inputs, target)``;
    ids are the dataset positions unless ``ids`` ``[N]`` gives them."""
    if isinstance(dataset, Dataset):
        x, y = dataset.tensors()
        return IndexedDataset(torch.utils.data.TensorDataset(x, y), dataset.example_ids if ids is None else ids)
    return IndexedDataset(dataset, ids)


def _check_unique(ids: Tensor, what: str) -> None:
    uniq, counts = torch.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][:5].tolist()
        raise DataError(f"{what}: duplicate example ids, e.g. {dup}; every example needs its own id")


# ---------------------------------------------------------------- Examples

class _LazyInputs:
    """``x[positions]`` for a data set not held in memory: fetches and collates those items."""

    def __init__(self, src: "Examples"):
        self.src = src

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, positions: Tensor) -> Any:
        return self.src.fetch(positions)[2]


class Examples:
    """A training (or test) set as :func:`gradsift.fit` and :class:`gradsift.Sifter` read it.

    Attributes:
        source: what it wraps. kind: ``"memory"``, ``"dataset"`` or ``"loader"``.
    """

    def __init__(self, source: Any, *, num_workers: int = 0, device: Any = None):
        self.source, self.num_workers, self.device = source, num_workers, device
        self._ids: Tensor | None = None
        self._y: Tensor | None = None
        if isinstance(source, Dataset):
            self.kind = "memory"
            self._x, self._y = source.tensors()
            self._ids = torch.from_numpy(source.example_ids)
            self.dataset = None
        elif isinstance(source, DataLoader):
            self.kind = "loader"
            self.dataset = source.dataset
        elif isinstance(source, TorchDataset) or (
                hasattr(source, "__getitem__") and hasattr(source, "__len__")
                and not isinstance(source, (str, bytes, dict, np.ndarray, Tensor))):
            if isinstance(source, IterableDataset):
                raise DataError("an IterableDataset has no positions; wrap it in a DataLoader whose "
                                "batches are (example_ids, inputs, targets)")
            self.kind = "dataset"
            self.dataset = source
        else:
            raise DataError(
                f"cannot train on a {type(source).__name__}: give a gs.data.Dataset, a torch Dataset "
                f"of {FORMS} items, or a DataLoader"
            )
        if self.dataset is not None and not isinstance(self.dataset, IterableDataset) and len(self) == 0:
            raise DataError("the data set is empty (no examples)")

    # ------------------------------------------------------------ size, ids, targets
    @property
    def map_style(self) -> bool:
        return self.dataset is None or not isinstance(self.dataset, IterableDataset)

    def __len__(self) -> int:
        if self.kind == "memory":
            return len(self._y)
        if not self.map_style:
            raise DataError("an iterable dataset has no length")
        return len(self.dataset)

    @property
    def ids(self) -> Tensor:
        """``[N]`` int64 example ids in position order (one pass over the items when they
        carry their own ids and the data set does not list them)."""
        if self._ids is None:
            ds = self.dataset
            if isinstance(ds, IndexedDataset):
                self._ids = ds.ids
            elif split_item(ds[0], f"0 of {type(ds).__name__}")[0] is None:  # (inputs, target): positions
                self._ids = torch.arange(len(self))
            else:
                self._scan()
        return self._ids

    @property
    def y(self) -> Tensor:
        """``[N]`` targets in position order (read without a pass where the data set keeps
        them: ``TensorDataset``, ``.targets``; otherwise one pass over the items)."""
        if self._y is None:
            ds = self.dataset.dataset if isinstance(self.dataset, IndexedDataset) else self.dataset
            if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
                self._y = ds.tensors[1]
            elif getattr(ds, "targets", None) is not None:
                self._y = torch.as_tensor(np.asarray(ds.targets))
            else:
                self._scan()
        return self._y

    def positions_of(self, ids: Tensor) -> Tensor:
        """``[b]`` positions of the examples with ids ``ids`` ``[b]``.

        Raises:
            DataError: an id is not in the data set.
        """
        if not hasattr(self, "_order"):
            self._order = torch.argsort(self.ids)
            self._sorted = self.ids[self._order]
        ids = torch.as_tensor(ids, dtype=torch.int64).cpu()
        k = torch.searchsorted(self._sorted, ids).clamp(max=max(len(self._sorted) - 1, 0))
        found = self._sorted[k] == ids
        if not bool(found.all()):
            raise DataError(f"example id {int(ids[~found][0])} is not in the data set")
        return self._order[k]

    @property
    def x(self) -> Any:
        """Inputs indexable by a ``[b]`` position tensor (a tensor for in-memory data)."""
        return self._x if self.kind == "memory" else _LazyInputs(self)

    def _scan(self) -> None:
        ids, ys = [], []
        for i in range(len(self)):
            pid, _, target = split_item(self.dataset[i], f"{i} of {type(self.dataset).__name__}")
            ids.append(i if pid is None else pid)
            ys.append(target)
        self._ids = torch.tensor(ids, dtype=torch.int64)
        _check_unique(self._ids, type(self.dataset).__name__)
        if self._y is None:
            self._y = torch.as_tensor(default_collate(ys))

    # ------------------------------------------------------------ batches
    def fetch(self, positions: Tensor) -> tuple[Tensor, Tensor, Any, Tensor]:
        """``(positions [b], ids [b], inputs, targets [b])`` of the examples at ``positions``."""
        positions = torch.as_tensor(positions, dtype=torch.int64).cpu()
        if self.kind == "memory":
            return positions, self._ids[positions], self._x[positions], self._y[positions]
        pos = positions.tolist()
        if not pos:
            raise DataError("an empty batch of a torch Dataset cannot be collated")
        ids, x, y = collate([self.dataset[i] for i in pos], pos)
        return positions, ids, x, y

    def _loader(self, batches: list[list[int]] | Any) -> DataLoader:
        return DataLoader(_Positioned(self.dataset), batch_sampler=batches, collate_fn=_collate_positioned,
                          num_workers=self.num_workers)

    def epoch(self, sampler: Callable[[int], Any] | None, epoch: int) -> Iterator[tuple[Tensor, Tensor, Any, Tensor]]:
        """One epoch of ``(positions [B], ids [B], inputs, targets [B])``: the batches of
        ``sampler(epoch)`` (positions), or the DataLoader's own batches."""
        if self.kind == "loader":
            yield from self._loader_epoch()
            return
        batches = [torch.as_tensor(b, dtype=torch.int64) for b in sampler(epoch)]
        if self.kind == "memory" or self.num_workers == 0:
            for b in batches:
                if len(b) == 0:  # an empty Poisson batch is still a step
                    yield b, b, None, b
                else:
                    yield self.fetch(b)
            return
        nonempty = [b.tolist() for b in batches if len(b)]
        it = iter(self._loader(nonempty))
        for b in batches:
            yield (b, b, None, b) if len(b) == 0 else next(it)

    def _loader_epoch(self, *, in_order: bool = False) -> Iterator[tuple[Tensor, Tensor, Any, Tensor]]:
        """The DataLoader's batches with positions; ``in_order``: the same data set, collate
        and workers, but sequential batches (no sampler draws, so no RNG is consumed)."""
        loader: DataLoader = self.source
        if not self.map_style:
            for k, batch in enumerate(loader):
                if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
                    raise DataError(f"batch {k} of an iterable DataLoader is {_describe(batch)}; it must be "
                                    "(example_ids, inputs, targets)")
                ids = torch.as_tensor(batch[0], dtype=torch.int64)
                yield ids, ids, batch[1], batch[2]
            return
        workers = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                       worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context)
        if loader.num_workers:
            workers["prefetch_factor"] = loader.prefetch_factor
        if in_order:
            batching = dict(batch_size=loader.batch_size or 256, shuffle=False)
        else:
            batching = dict(batch_sampler=loader.batch_sampler, generator=loader.generator,
                            persistent_workers=loader.persistent_workers if loader.num_workers else False)
        rewired = DataLoader(_Positioned(loader.dataset), collate_fn=_PositionedCollate(loader.collate_fn),
                             **batching, **workers)
        for k, (positions, batch) in enumerate(rewired):
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                yield positions, positions, batch[0], torch.as_tensor(batch[1])
            elif isinstance(batch, (tuple, list)) and len(batch) == 3:
                yield positions, torch.as_tensor(batch[0], dtype=torch.int64), batch[1], torch.as_tensor(batch[2])
            else:
                raise DataError(f"batch {k} of the DataLoader is {_describe(batch)}; expected "
                                "(inputs, targets) or (example_ids, inputs, targets)")

    def sequential(self, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
        """``(inputs, targets)`` batches over all examples in order (whole-data-set passes;
        a DataLoader's data set is read in order with its collate and workers)."""
        if self.kind == "loader":
            for _, _, x, y in self._loader_epoch(in_order=True):
                yield x, y
            return
        n = len(self)
        for start in range(0, n, batch_size):
            _, _, x, y = self.fetch(torch.arange(start, min(n, start + batch_size)))
            yield x, y

    def map_positions(self, fn: Callable[[Tensor], Any], positions: Tensor, batch_size: int = 1024) -> Any:
        """``fn(positions [b])`` over ``positions`` in chunks, concatenated."""
        if self.kind == "memory":
            return fn(positions)
        outs = [fn(positions[s : s + batch_size]) for s in range(0, len(positions), batch_size)]
        if not outs:
            return fn(positions)
        if isinstance(outs[0], tuple):
            return tuple(None if o[0] is None else torch.cat([p[k] for p in outs]) for k, o in enumerate(zip(*outs)))
        return torch.cat(outs)


class _Positioned(TorchDataset):
    def __init__(self, dataset: TorchDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i]


def _collate_positioned(pairs: list[tuple[int, Any]]) -> tuple[Tensor, Tensor, Any, Tensor]:
    pos = [p for p, _ in pairs]
    ids, x, y = collate([it for _, it in pairs], pos)
    return torch.tensor(pos, dtype=torch.int64), ids, x, y


class _PositionedCollate:
    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[Tensor, Any]:
        pos = [p for p, _ in pairs]
        items = [it for _, it in pairs]
        for p, it in zip(pos, items):
            split_item(it, f"at position {p}")
        return torch.tensor(pos, dtype=torch.int64), self.collate_fn(items)


def examples(source: Any, *, num_workers: int = 0) -> Examples:
    """Wrap a :class:`~gradsift.data.Dataset`, a torch ``Dataset`` of ``(inputs, target)``
    / ``(example_id, inputs, target)`` items or a ``DataLoader`` (returned as is if it is
    already :class:`Examples`)."""
    return source if isinstance(source, Examples) else Examples(source, num_workers=num_workers)
