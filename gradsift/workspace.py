"""Reusable workspaces: the ``B x P`` buffers that per-example results are written into.

Writing ``B x P`` floats into freshly allocated memory costs several times writing them
into memory that was written before: every new page is zero-filled by the kernel on first
touch (a minor page fault), and a large tensor is ``mmap``-ed on allocation and unmapped
on release, so a loop that allocates its per-example gradients afresh pays that cost every
step (issue 14: about 80% of the time of per-example gradients on an MLP). The same goes
for scratch blocks of the block-wise reductions (``aggregate``).

Two ways to reuse memory, both device-agnostic (on CUDA the caching allocator already
avoids the faults; the pool then only saves allocator calls):

* **The pool** (default, safe). :func:`acquire` returns a flat buffer that nobody holds
  any more, or a new one. Per-example results handed to a caller are views of such a
  buffer, so they are *never overwritten while the caller holds any of them* (or any view
  of them, a NumPy array made from one, ...): a buffer is reused only when its storage
  is referenced by the pool alone (the storage's use count). Once the caller drops the
  results, the next call writes into the same, already-touched memory. The pool keeps at
  most :data:`MAX_BUFFERS` buffers per device and dtype (the most recently used); free
  them with :func:`release`.
* **A caller-owned** :class:`Workspace`, passed as ``workspace=`` (e.g. to
  :func:`gradsift.per_example_gradients`): results are written into it at every call,
  *overwriting the previous call's results* -- an explicit opt-in for loops that hold the
  previous results while computing the next ones but no longer need them.

Example::

    ws = gs.Workspace()
    for x, y in batches:
        grads = gs.per_example_gradients(model, loss_fn, x, y, workspace=ws)  # views of ws
        ...  # grads of the previous batch are overwritten
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

#: Most buffers the pool keeps per (device, dtype); ``0`` disables pooling.
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


def release() -> None:
    """Drop every pooled buffer (memory held by callers stays theirs)."""
    with _lock:
        _pool.clear()


def pooled_bytes() -> int:
    """Bytes of all buffers the pool holds (held by callers or free)."""
    with _lock:
        return sum(e.buf.numel() * e.buf.element_size() for es in _pool.values() for e in es)


class Workspace:
    """A buffer owned by the caller; every call that writes into it overwrites it.

    Pass it as ``workspace=`` to opt in to results that are views of this buffer (see the
    module docs). It grows when a call needs more room (it never shrinks), and follows the
    dtype and device the call asks for.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def take(self, numel: int, *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """A flat ``[numel]`` view of its buffer for this dtype and device (uninitialized;
        previous results in it are overwritten)."""
        key = (torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # let the old buffer go before allocating the new one
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=key[0])
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        """Bytes held (0 before the first use)."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def take(numel: int, *, dtype: torch.dtype, device: torch.device | str, workspace: Workspace | None = None) -> Tensor:
    """``workspace.take(...)`` when a workspace is given, else :func:`acquire` from the pool."""
    if workspace is not None:
        return workspace.take(numel, dtype=dtype, device=device)
    return acquire(numel, dtype=dtype, device=device)
