"""CPU work split over torch's thread count, for kernels that run one thread each.

torch's own CPU kernels use ``torch.get_num_threads()`` threads; a few of gradsift's do
not by themselves (a generator's ``normal_``, a Numba kernel). :func:`thread_map` runs
such jobs on a small pool of that many threads; the kernels release the GIL, so they
run in parallel::

    thread_map(fill, jobs)   # fill(job) for every job, on torch.get_num_threads() threads
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

J = TypeVar("J")
R = TypeVar("R")


@functools.lru_cache(maxsize=1)
def _pool(n: int, pid: int) -> ThreadPoolExecutor:
    """The ``n`` worker threads of this process (``pid``: a forked child makes its own).
    Sized by torch's thread count, not by a call's jobs, so that calls with different
    numbers of jobs share one pool."""
    return ThreadPoolExecutor(n, thread_name_prefix="gradsift")


def thread_count(jobs: int) -> int:
    """How many threads :func:`thread_map` uses for ``jobs`` jobs: ``torch.get_num_threads()``,
    at most one per job."""
    return max(1, min(torch.get_num_threads(), jobs))


def thread_map(fn: Callable[[J], R], jobs: Iterable[J]) -> list[R]:
    """``[fn(job) for job in jobs]``, on :func:`thread_count` threads (in this thread when
    that is one). ``fn`` should release the GIL for this to pay."""
    jobs = list(jobs)
    n = thread_count(len(jobs))
    if n == 1:
        return [fn(job) for job in jobs]
    return list(_pool(torch.get_num_threads(), os.getpid()).map(fn, jobs))


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` as ``parts`` contiguous ``(lo, hi)`` ranges of near-equal size (no empty one)."""
    parts = max(1, min(parts, n))
    return [(n * p // parts, n * (p + 1) // parts) for p in range(parts)]
