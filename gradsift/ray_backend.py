"""Ray as a :class:`gradsift.backends.Backend`: every call a Ray task.

    backend = gs.backends.backend_from_spec("ray")                  # local ray.init()
    backend = gs.backends.backend_from_spec("ray", address="auto")  # a running cluster
    mem = gs.scores.memorization_scores(train, model_fn, n_models=64, backend=backend)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import GradsiftError

__all__ = ["RayBackend", "call_one_thread"]


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
                root = str(Path(__file__).resolve().parents[1])
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
        task = ray.remote(num_cpus=1, max_retries=0)(call_one_thread)
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


def call_one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with one torch thread (a Ray task holds one CPU)."""
    torch.set_num_threads(1)
    return fn(*args)
