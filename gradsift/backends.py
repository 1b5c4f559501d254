"""Where many-model jobs run: in this process, as Ray tasks, or over torchrun ranks.

A *many-model job* trains independent models: the ``K`` subset models of Feldman-Zhang
memorization scores, the initializations of Data Diet scores, the seeds of a pruning curve.
:func:`gradsift.ensemble.run_members` cuts such a job into tasks of a few members and
hands them to a :class:`Backend`; each task trains its members exactly as one process
would, so the models, and every score computed from them, do not depend on the backend.

    backend = gs.backends.backend_from_spec("ray")                  # local ray.init()
    backend = gs.backends.backend_from_spec("ray", address="auto")  # a running cluster
    mem = gs.scores.memorization_scores(train, model_fn, n_models=64, backend=backend)

A backend is anything with ``workers`` and ``map(fn, calls)``: :class:`InProcess`,
:class:`RankBackend` (torchrun ranks, over a :class:`gradsift.distributed.Comm`) and
:class:`gradsift.ray_backend.RayBackend`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from .errors import GradsiftError

__all__ = ["Backend", "InProcess", "RankBackend", "backend_from_spec"]


class Backend(Protocol):
    """Runs independent calls ``fn(*args)`` and returns their results in order."""

    #: how many tasks can run at once (used to size tasks)
    workers: int

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]: ...


class InProcess:
    """Every call here, one after another."""

    workers = 1

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        return [fn(*args) for args in calls]


class RankBackend:
    """Calls spread over the ranks of a torchrun job: call ``i`` runs on rank
    ``i % world_size``; every rank gets every result (all-gather over ``comm``, a
    :class:`gradsift.distributed.Comm`)."""

    def __init__(self, comm: Any):
        self.comm = comm
        self.workers = comm.world_size

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        mine = {i: fn(*args) for i, args in enumerate(calls) if i % self.comm.world_size == self.comm.rank}
        merged: dict[int, Any] = {}
        for part in self.comm.all_gather_object(mine):
            merged.update(part)
        return [merged[i] for i in range(len(calls))]


def backend_from_spec(name: str = "local", *, address: str | None = None, num_cpus: int | None = None) -> Backend:
    """``"local"`` (this process), ``"ray"`` (:class:`gradsift.ray_backend.RayBackend`) or,
    under torchrun, ``"torchrun"`` (:class:`RankBackend` over the process group)."""
    if name in ("local", "inprocess", "none"):
        if address is not None:
            raise GradsiftError("--ray-address needs --backend ray")
        return InProcess()
    if name == "ray":
        from .ray_backend import RayBackend

        return RayBackend(address, num_cpus=num_cpus)
    if name == "torchrun":
        from .distributed.comm import init_from_env

        return RankBackend(init_from_env())
    raise GradsiftError(f"unknown backend '{name}': use local, ray or torchrun")
