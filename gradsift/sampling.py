"""Every batch sampler of gradsift: shuffled, weighted and Poisson.

A *sampler* here is a callable ``epoch -> iterable of [B] int64 position tensors``
(:data:`Sampler`), deterministic under its seed and the epoch, so a resumed run repeats
exactly the batches the interrupted one would have drawn:

* :func:`shuffled_batches`: a fresh permutation per epoch cut into batches (the default
  of :func:`gradsift.fit`).
* :func:`weighted_sampler`: draws with replacement, proportionally to weights (e.g. from
  :func:`gradsift.actions.reweight`).
* :func:`poisson_batches`: Poisson sampling, as DP-SGD's accounting assumes (below).

Poisson sampling
----------------
With Poisson sampling every example joins each batch independently with probability
``q`` (the *sampling rate*), so batch sizes vary (``Binomial(N, q)``, empty batches
included) and the expected batch size is ``L = q N``. The privacy accountants of
:mod:`gradsift.privacy` (Opacus's RDP and PRV accountants) analyse exactly this
"subsampled Gaussian mechanism"; a shuffled loader with fixed-size batches is a
different mechanism and their epsilon does not hold for it.

Two forms of the same sampler:

* :func:`poisson_batches` for :func:`gradsift.fit` (``sampler=``): ``epoch -> batches``
  of positions, deterministic under ``seed`` and the epoch (so resuming repeats nothing).
* :class:`PoissonBatchSampler` for a ``torch.utils.data.DataLoader``
  (``DataLoader(ds, batch_sampler=PoissonBatchSampler(len(ds), q))``).

Both carry ``sampling = "poisson"`` and ``sample_rate``, which is what
:func:`declared_sampling` reads to check that a loader samples as declared.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["Sampler", "shuffled_batches", "weighted_sampler", "poisson_batches",
           "PoissonBatchSampler", "poisson_mask", "declared_sampling", "steps_per_epoch"]

#: ``epoch -> iterable of [B] int64 position tensors`` (epochs count from 1).
Sampler = Callable[[int], Iterable[Tensor]]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Sampler:
    """Each epoch a fresh permutation of ``0..n-1`` (seeded by ``seed`` and the epoch) cut
    into batches of ``batch_size`` (the last may be smaller)."""

    def sample(epoch: int) -> Iterator[Tensor]:
        order = torch.randperm(n, generator=_epoch_generator(seed, epoch))
        yield from order.split(batch_size)

    return sample


def weighted_sampler(weights: np.ndarray, batch_size: int, *, seed: int = 0,
                     num_samples: int | None = None) -> Sampler:
    """Draw ``num_samples`` (default ``N``) positions per epoch with replacement, with
    probability proportional to ``weights`` ``[N]``, in batches of ``batch_size``."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    n = num_samples or len(w)

    def sample(epoch: int) -> Iterator[Tensor]:
        g = _epoch_generator(seed, epoch)
        yield from torch.multinomial(w, n, replacement=True, generator=g).split(batch_size)

    return sample


def steps_per_epoch(sample_rate: float) -> int:
    """Batches per epoch for Poisson sampling at rate ``q``: ``round(1 / q)`` (at least 1),
    so that an epoch sees ``N`` examples in expectation (Opacus's convention)."""
    _check_rate(sample_rate)
    return max(1, round(1.0 / sample_rate))


def _check_rate(q: float) -> None:
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")


def poisson_mask(n: int, sample_rate: float, generator: torch.Generator | None = None) -> Tensor:
    """``[n]`` bool: each entry True independently with probability ``sample_rate``."""
    _check_rate(sample_rate)
    return torch.rand(n, generator=generator) < sample_rate


class _PoissonBatches:
    """Callable ``epoch -> iterator of [B_t] position tensors`` (see :func:`poisson_batches`)."""

    sampling = "poisson"

    def __init__(self, n: int, sample_rate: float, seed: int, steps: int | None):
        _check_rate(sample_rate)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.sample_rate, self.seed = n, float(sample_rate), seed
        self.steps = steps_per_epoch(sample_rate) if steps is None else int(steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def __call__(self, epoch: int) -> Iterator[Tensor]:
        g = _epoch_generator(self.seed, epoch)
        for _ in range(self.steps):
            yield torch.nonzero(poisson_mask(self.n, self.sample_rate, g)).flatten()

    def __repr__(self) -> str:
        return f"poisson_batches(n={self.n}, sample_rate={self.sample_rate:g}, steps={self.steps})"


def poisson_batches(n: int, sample_rate: float, *, seed: int = 0, steps: int | None = None) -> _PoissonBatches:
    """A :func:`gradsift.fit` sampler with Poisson sampling.

    Args:
        n: training-set size N.
        sample_rate: q, each example's probability of joining a batch.
        seed: with the epoch number, fixes the batches (deterministic and resumable).
        steps: batches per epoch (default :func:`steps_per_epoch`, ``round(1/q)``).

    Returns:
        ``epoch -> iterator`` of ``[B_t]`` int64 position tensors, ``B_t ~ Binomial(N, q)``
        (possibly 0), each sorted ascending.
    """
    return _PoissonBatches(n, sample_rate, seed, steps)


class PoissonBatchSampler(torch.utils.data.Sampler[list[int]]):
    """``torch.utils.data`` batch sampler with Poisson sampling (may yield empty batches).

    Use as ``DataLoader(dataset, batch_sampler=PoissonBatchSampler(len(dataset), q))``;
    a default ``collate_fn`` cannot stack an empty batch, so handle ``[]`` in yours or
    index tensors directly.

    Args:
        n: data-set size. sample_rate: q. steps: batches per pass (default ``round(1/q)``).
        generator: random source (default: a fresh one seeded from torch's global RNG).
    """

    sampling = "poisson"

    def __init__(self, n: int, sample_rate: float, *, steps: int | None = None,
                 generator: torch.Generator | None = None):
        _check_rate(sample_rate)
        self.n, self.sample_rate = n, float(sample_rate)
        self.steps = steps_per_epoch(sample_rate) if steps is None else int(steps)
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        if g is None:
            g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        for _ in range(self.steps):
            yield torch.nonzero(poisson_mask(self.n, self.sample_rate, g)).flatten().tolist()


def declared_sampling(loader_or_sampler: object) -> tuple[str, float | None]:
    """How a sampler, batch sampler or ``DataLoader`` samples: ``("poisson", q)`` for the
    samplers of this module (and Opacus's ``UniformWithReplacementSampler``), else
    ``("other", None)`` — e.g. a shuffled ``DataLoader`` or fixed-size batches."""
    obj = getattr(loader_or_sampler, "batch_sampler", None) or loader_or_sampler
    if getattr(obj, "sampling", None) == "poisson":
        return "poisson", float(obj.sample_rate)
    if type(obj).__name__ == "UniformWithReplacementSampler":
        return "poisson", float(obj.sample_rate)
    return "other", None
