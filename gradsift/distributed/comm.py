"""Collective communication for gradsift's distributed code.

Everything distributed in gradsift talks through a :class:`Comm`: a rank, a world size
and four collectives. :class:`TorchComm` is ``torch.distributed`` (gloo on CPU, nccl on
GPUs); any object with the same methods (e.g. a thread-based one in tests) works too.

Every collective of :class:`TorchComm` turns a failure (a peer that died, a timeout, a
broken connection) into a :class:`DistributedError` that says which collective failed,
so a job with a dead rank stops with a clear message instead of a backend traceback.
"""

from __future__ import annotations

import datetime
import os
import signal
from contextlib import contextmanager
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import GradsiftError

__all__ = [
    "Comm", "TorchComm", "DistributedError", "shard_bounds", "init_from_env",
    "launched_by_torchrun", "gather_rows",
]


class DistributedError(GradsiftError, RuntimeError):
    """A collective failed: another rank died, timed out, or the network broke."""


class Comm(Protocol):
    """What gradsift needs from a process group. Collectives must be called by every
    rank in the same order."""

    rank: int
    world_size: int

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Element-wise sum over ranks; every rank gets the result (same shape as ``t``)."""
        ...

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """``t`` of every rank, in rank order (the shapes must agree across ranks)."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """A picklable object of every rank, in rank order."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s object on every rank."""
        ...


def shard_bounds(n: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous shards of ``n`` items over ``world_size`` ranks, in rank order, with sizes
    as equal as possible (``numpy.array_split`` rule: the first ``n % world_size`` ranks
    get one more). Concatenating the shards in rank order gives back the whole, in order.
    """
    base, extra = divmod(n, world_size)
    out, start = [], 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def gather_rows(comm: Comm, t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate ``t`` ``[b_r, *shape]`` of every rank in rank order: ``[sum b_r, *shape]``.

    The ``b_r`` may differ between ranks (each pads to the largest, the padding is cut);
    pass ``sizes`` (every rank's ``b_r``) when known, to save one collective.
    """
    if sizes is None:
        sizes = comm.all_gather_object(int(t.shape[0]))
    most = max(sizes)
    padded = t if t.shape[0] == most else torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = comm.all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class TorchComm:
    """A :class:`Comm` over a ``torch.distributed`` process group (the default one).

    Tensors are moved to ``device`` for the collectives (``cuda`` for nccl) and results
    come back on the caller's device.
    """

    def __init__(self, device: torch.device | str = "cpu", group: Any = None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.where = "setup"  # set by callers (e.g. "epoch 2 step 17") for error messages

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend failure is the same to the user
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed during {self.where} "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). "
                "Another rank probably died or timed out, or the network broke."
            ) from e

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        with self._guard("all_reduce"):
            buf = t.to(self.device).contiguous().clone()
            self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)
            return buf.to(t.device)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        with self._guard("all_gather"):
            buf = t.to(self.device).contiguous()
            out = [torch.empty_like(buf) for _ in range(self.world_size)]
            self._dist.all_gather(out, buf, group=self.group)
            return [o.to(t.device) for o in out]

    def all_gather_object(self, obj: Any) -> list[Any]:
        with self._guard("all_gather_object"):
            out: list[Any] = [None] * self.world_size
            self._dist.all_gather_object(out, obj, group=self.group)
            return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        with self._guard("broadcast"):
            box = [obj]
            self._dist.broadcast_object_list(box, src=src, group=self.group)
            return box[0]

    def close(self) -> None:
        """Leave the process group (call once, at the end of the job)."""
        if self._dist.is_initialized():
            self._dist.destroy_process_group()

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s values."""
        with self._guard("broadcast"):
            for t in tensors:
                buf = t.data.to(self.device).contiguous()
                self._dist.broadcast(buf, src=src, group=self.group)
                if buf.data_ptr() != t.data.data_ptr():
                    t.data.copy_(buf.to(t.device))


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or anything that sets its
    variables: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: str = "auto", timeout_s: float = 300.0) -> TorchComm:
    """Join the process group described by the ``torchrun`` environment variables.

    Args:
        backend: ``"gloo"`` (CPU), ``"nccl"`` (one GPU per rank) or ``"auto"``: nccl when
            CUDA is available, else gloo.
        timeout_s: how long a collective waits for the other ranks before failing (so a
            dead rank makes the others fail instead of hanging).

    Returns:
        A :class:`TorchComm`; with nccl its device is ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"unknown torch.distributed backend '{backend}': use gloo, nccl or auto")
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001
            raise DistributedError(
                f"could not join the process group ({type(e).__name__}: {e}). Start the job with "
                "torchrun (e.g. torchrun --nproc-per-node 2 -m gradsift train ...) and check "
                "MASTER_ADDR/MASTER_PORT or --rdzv-endpoint."
            ) from e
    _stop_on_sigterm()
    return TorchComm(device)


def _stop_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails; turn that into an
    exception so the rank leaves with a message (finished epochs are already saved)."""

    def handler(signum: int, frame: Any) -> None:
        raise DistributedError(
            "stopped by the launcher (SIGTERM), most likely because another rank failed"
        )

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass
