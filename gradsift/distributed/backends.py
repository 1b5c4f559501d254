"""Where many-model jobs run: in this process, as Ray tasks, or over torchrun ranks.

A *many-model job* trains independent models: the ``K`` subset models of Feldman-Zhang
memorization scores, the initializations of Data Diet scores, the seeds of a pruning curve.
:func:`run_members` cuts such a job into tasks of a few members and hands them to a
:class:`Backend`; each task trains its members exactly as one process would (same member
ids, hence same initializations and batch orders, and the same vmap-or-loop path), so the
models, and every score computed from them, do not depend on the backend.

    backend = gs.distributed.backend_from_spec("ray")               # local ray.init()
    backend = gs.distributed.backend_from_spec("ray", address="auto")  # a running cluster
    mem = gs.scores.memorization_scores(train, model_fn, n_models=64, backend=backend)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..errors import GradsiftError

__all__ = ["Backend", "InProcess", "RayBackend", "RankBackend", "backend_from_spec", "run_members"]


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


class RayBackend:
    """Every call a Ray task (``num_cpus=1`` each).

    Args:
        address: ``None`` starts a local Ray (``ray.init()``); ``"auto"`` or
            ``"ray://HOST:10001"`` joins a running cluster (every node needs gradsift and
            the same torch installed).
        num_cpus: CPUs of a local Ray (default: all).
        shutdown: shut Ray down after each :meth:`map` if this object started it.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, shutdown: bool = False):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise GradsiftError("--backend ray needs Ray: pip install 'gradsift[ray]'") from None
        self.address, self.num_cpus, self.shutdown = address, num_cpus, shutdown
        self._started = False

    def _init(self):
        import ray

        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if self.address is None:
                # local workers must import this gradsift even when it is not installed
                root = str(Path(__file__).resolve().parents[2])
                path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
                kwargs.update(num_cpus=self.num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}})
            else:
                kwargs.update(address=self.address)
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001
                raise GradsiftError(f"could not start or join Ray ({self.address or 'local'}): {e}") from e
            self._started = True
        return ray

    @property
    def workers(self) -> int:
        ray = self._init()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        ray = self._init()
        task = ray.remote(num_cpus=1, max_retries=0)(_call_one_thread)
        try:
            return ray.get([task.remote(fn, *args) for args in calls])
        except ray.exceptions.RayError as e:
            raise GradsiftError(f"a Ray task failed: {e}") from e
        finally:
            if self.shutdown and self._started:
                ray.shutdown()
                self._started = False

    def close(self) -> None:
        """Shut down the Ray this object started."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _call_one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with one torch thread (a Ray task holds one CPU)."""
    torch.set_num_threads(1)
    return fn(*args)


class RankBackend:
    """Calls spread over the ranks of a torchrun job: call ``i`` runs on rank
    ``i % world_size``; every rank gets every result (all-gather)."""

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
    """``"local"`` (this process), ``"ray"`` (:class:`RayBackend`) or, under torchrun,
    ``"torchrun"`` (:class:`RankBackend` over the process group)."""
    if name in ("local", "inprocess", "none"):
        if address is not None:
            raise GradsiftError("--ray-address needs --backend ray")
        return InProcess()
    if name == "ray":
        return RayBackend(address, num_cpus=num_cpus)
    if name == "torchrun":
        from .comm import init_from_env

        return RankBackend(init_from_env())
    raise GradsiftError(f"unknown backend '{name}': use local, ray or torchrun")


# ---------------------------------------------------------------- many-model training

def _train_task(model_fn: Callable[[int], nn.Module], x: Tensor, y: Tensor, masks: Tensor,
                ids: list[int], kwargs: dict) -> list[dict[str, Tensor]]:
    from ..scores.members import train_members

    models = train_members(model_fn, x, y, masks, member_ids=ids, **kwargs)
    return [m.state_dict() for m in models]


def run_members(backend: Backend, model_fn: Callable[[int], nn.Module], x: Tensor, y: Tensor,
                masks: Tensor, ids: list[int], members_per_task: int | None, kwargs: dict) -> list[nn.Module]:
    """:func:`gradsift.scores.members.train_members` on ``backend``: the members cut into
    tasks, the trained models returned in order (in eval mode)."""
    from ..scores.members import _can_vectorize

    models = [model_fn(k) for k in ids]
    vectorize = kwargs.get("vectorize")
    possible = _can_vectorize(models, masks)
    if vectorize and not possible:
        raise ValueError("members cannot be trained with vmap (unequal subset sizes, BatchNorm or Dropout)")
    # the path one process would take for the whole job; every task takes it too
    vectorize = bool(possible and len(models) > 1) if vectorize is None else bool(vectorize)
    if members_per_task is None:
        members_per_task = max(1, math.ceil(len(ids) / max(1, backend.workers))) if vectorize else 1
    calls = [(model_fn, x, y, masks[i : i + members_per_task], ids[i : i + members_per_task],
              {**kwargs, "vectorize": vectorize})
             for i in range(0, len(ids), members_per_task)]
    states = [s for chunk in backend.map(_train_task, calls) for s in chunk]
    for m, s in zip(models, states):
        m.load_state_dict(s)
        m.eval()
    return models
