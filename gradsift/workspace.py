"""Reusable workspaces: the ``B x P`` buffers that per-example results are written into.

Writing ``B x P`` floats into freshly allocated memory costs several times writing them
into memory that was written before: every new page is zero-filled by the kernel on first
touch (a minor page fault), and a large tensor is ``mmap``-ed on allocation and unmapped
on release, so a loop that allocates its per-example gradients afresh pays that cost every
step (issue 14: about 80% of the time of per-example gradients on an MLP). The same goes
for scratch blocks of the block-wise reductions (``aggregate``).

Two ways to reuse memory, both device-agnostic (on CUDA the caching allocator already
avoids the faults; the pool then only saves allocator calls):

* **The pool** (default, safe). :func:`acquire_set` returns per-example result tensors
  (one storage per parameter, so keeping or saving one never drags the others along) from
  a pooled set that nobody holds any more, or new ones. Results handed to a caller are
  views of such a set, so they are *never overwritten while the caller holds any of them*
  (or any view of them, a NumPy array made from one, ...): a set is reused only when its
  storages are referenced by the pool alone (the storages' use counts). Once the caller
  drops the results, the next call writes into the same, already-touched memory.
  :func:`acquire` does the same for one flat buffer (kernels' scratch blocks). The pool
  keeps at most :data:`MAX_BUFFERS` sets, and as many buffers per device, dtype and kind
  (the most recently used); free them with :func:`release`.
* **A caller-owned** :class:`Workspace`, passed as ``workspace=`` (e.g. to
  :func:`gradsift.per_example_gradients`): results are written into it at every call,
  *overwriting the previous call's results* -- an explicit opt-in for loops that hold the
  previous results while computing the next ones but no longer need them.

Example::

    ws = gs.Workspace()
    for x, y in batches:
        grads = gs.per_example_gradients(model, loss_fn, x, y, workspace=ws)  # ws's tensors
        ...  # grads of the previous batch are overwritten
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Most result sets, and most buffers per (device, dtype, kind), the pool keeps; ``0`` disables pooling.
MAX_BUFFERS = 2

_lock = threading.Lock()
_pool: dict[tuple[torch.device, torch.dtype, str], list["_Entry"]] = {}
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(buf: Tensor) -> int:
    """How many tensors share ``buf``'s storage (views included); -1 if torch cannot say."""
    if _use_count is None:
        return -1
    storage = buf.untyped_storage()
    return int(_use_count(storage._cdata))


class _Entry:
    """A pooled buffer and its use count when the pool alone holds it."""

    def __init__(self, buf: Tensor) -> None:
        self.buf = buf
        self.alone = _holders(buf)

    def free(self) -> bool:
        return self.alone >= 0 and _holders(self.buf) == self.alone


def acquire(numel: int, *, dtype: torch.dtype, device: torch.device | str, kind: str = "results") -> Tensor:
    """A flat, contiguous ``[numel]`` tensor (uninitialized) from a pooled buffer that no
    caller holds, else newly allocated (and pooled).

    The returned tensor is a view of the pooled buffer, so the buffer counts as held for as
    long as the returned tensor or any view of it is alive. ``kind`` keeps separate pools
    (``"results"`` handed to callers, ``"scratch"`` for a kernel's temporary blocks), so
    that scratch blocks never push a results buffer out.
    """
    device = torch.device(device)
    if MAX_BUFFERS <= 0 or _use_count is None:
        return torch.empty(numel, dtype=dtype, device=device)
    key = (device, dtype, kind)
    with _lock:
        entries = _pool.setdefault(key, [])
        for k, e in enumerate(entries):
            if e.buf.numel() >= numel and e.free():
                entries.append(entries.pop(k))  # most recently used last
                return e.buf[:numel]
        # None fits: give back free buffers that are too small before allocating.
        entries[:] = [e for e in entries if not e.free()]
        buf = torch.empty(numel, dtype=dtype, device=device)
        entries.append(_Entry(buf))
        del entries[: max(0, len(entries) - MAX_BUFFERS)]
        return buf[:numel]


class _SetEntry:
    """A pooled set of tensors (one storage each) and their use counts when the pool alone holds them."""

    def __init__(self, key: tuple, tensors: dict[str, Tensor]) -> None:
        self.key = key
        self.tensors = tensors
        self.alone = {n: _holders(t) for n, t in tensors.items()}

    def free(self) -> bool:
        return all(self.alone[n] >= 0 and _holders(t) == self.alone[n] for n, t in self.tensors.items())


_sets: list[_SetEntry] = []


def acquire_set(specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]) -> dict[str, Tensor]:
    """Uninitialized contiguous tensors ``name -> [*shape]``, each with its own storage (so
    saving or keeping one never drags the others along), from a pooled set of exactly these
    shapes of which no caller holds any tensor (or view), else newly allocated (and pooled).

    Args:
        specs: name -> ``(shape, dtype, device)``.

    Returns:
        name -> a view of the pooled tensor (the set counts as held while any view lives).
    """
    key = tuple((n, tuple(shape), dt, torch.device(dv)) for n, (shape, dt, dv) in specs.items())
    if MAX_BUFFERS <= 0 or _use_count is None:
        return {n: torch.empty(shape, dtype=dt, device=dv) for n, shape, dt, dv in key}
    with _lock:
        for k, e in enumerate(_sets):
            if e.key == key and e.free():
                _sets.append(_sets.pop(k))  # most recently used last
                return {n: t.view(t.shape) for n, t in e.tensors.items()}
        # A miss: give back the free sets (other shapes) before allocating.
        _sets[:] = [e for e in _sets if not e.free()]
        tensors = {n: torch.empty(shape, dtype=dt, device=dv) for n, shape, dt, dv in key}
        _sets.append(_SetEntry(key, tensors))
        del _sets[: max(0, len(_sets) - MAX_BUFFERS)]
        return {n: t.view(t.shape) for n, t in tensors.items()}


def release() -> None:
    """Drop every pooled buffer (memory held by callers stays theirs)."""
    with _lock:
        _pool.clear()
        _sets.clear()


def pooled_bytes() -> int:
    """Bytes of all buffers the pool holds (held by callers or free)."""
    with _lock:
        flat = sum(e.buf.numel() * e.buf.element_size() for es in _pool.values() for e in es)
        return flat + sum(t.numel() * t.element_size() for e in _sets for t in e.tensors.values())


class Workspace:
    """Buffers owned by the caller; every call that writes into them overwrites them.

    Pass it as ``workspace=`` to opt in to results that are these buffers (see the module
    docs). A buffer is reallocated when a call needs another shape, dtype or device.
    """

    def __init__(self) -> None:
        self._set: dict[str, Tensor] = {}

    def take_set(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]) -> dict[str, Tensor]:
        """Tensors ``name -> [*shape]`` (uninitialized; the previous call's results in them
        are overwritten), reallocated when a name's shape, dtype or device changes."""
        out = {}
        for n, (shape, dt, dv) in specs.items():
            t = self._set.get(n)
            if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dt or t.device != torch.device(dv):
                self._set.pop(n, None)
                t = self._set[n] = torch.empty(shape, dtype=dt, device=dv)
            out[n] = t
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held (0 before the first use)."""
        return sum(t.numel() * t.element_size() for t in self._set.values())
