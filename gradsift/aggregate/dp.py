"""DP-SGD's aggregators: check, clip, sum over the expected batch size, add noise.

The mechanism and its accounting are described in :mod:`gradsift.privacy`; here is its
aggregation half::

    u = ( sum_{i in B} clip_C(g_i) + N(0, sigma^2 C^2 I) ) / L

* :func:`normalized_sum`: ``sum_i g_i / L`` -- one weighted sum (weights ``1/L``), so
  ``clip > normalized_sum`` runs layer-wise from ghost norms and one weighted sum per
  layer (book-keeping: the per-example gradients never exist), and sharded as one
  all-reduce of ``P`` values.
* :func:`gaussian_noise`: batch -> batch, ``N(0, (sigma C / L)^2)`` per coordinate.
* :func:`require_all_parameters`: refuses a batch lacking any trainable parameter.
* :func:`dp_sgd`: the chain of all of them.
"""

from __future__ import annotations

import numbers
import secrets
import threading
from typing import Iterator

import torch
from torch import Tensor

from ..errors import UnsupportedModelError
from ..threads import thread_map
from .base import (Aggregator, Grads, RowScale, State, WeightedSums, chain, reducer,
                   register_aggregator)
from .clip import clip


@register_aggregator("normalized_sum")
def normalized_sum(expected_batch_size: float) -> Aggregator:
    """``sum_i g_i / L`` over the batch: per-example ``[B, *shape]`` -> batch ``shape``.

    Args:
        expected_batch_size: L = q N, the *expected* batch size under Poisson sampling
            (not the actual B, which depends on the data). B = 0 gives zeros.
    """
    L = float(expected_batch_size)
    if not L > 0:
        raise ValueError(f"normalized_sum: expected_batch_size must be > 0, got {L}")

    def weights(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.full((1, b), 1.0 / L, dtype=dtype, device=device)

    form = WeightedSums(weights, lambda sums: {n: s[0] for n, s in sums.items()})
    return reducer(f"normalized_sum(L={L:g})", "normalized_sum", weighted_sums=form,
                   expected_batch_size=L)


def step_seed(seed: int | None, step: int) -> int:
    """The noise seed of step ``step``: from :mod:`secrets` when ``seed`` is None, else a
    deterministic function of ``(seed, step)``."""
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"DP noise seed must be an int or None, got {seed!r}")
    return (int(seed) * 1_000_003 + 7_919 * step + 1) % (2**63 - 1)


def step_generator(seed: int | None, step: int, device: torch.device) -> torch.Generator:
    """The noise generator of step ``step`` (seeded with :func:`step_seed`)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


#: CPU tensors of at least this many values get their noise in chunks drawn in parallel:
#: torch draws normals on the CPU in one thread (about 7 ns each here, 0.1 s for
#: ResNet-18's 11M parameters). Smaller tensors, and every tensor on CUDA, are drawn from
#: the step's one generator in turn.
PARALLEL_NOISE_MIN = 1 << 20
#: Values per chunk; each chunk has a generator of its own (:func:`chunk_seed`), so the
#: values do not depend on how many threads draw them.
NOISE_CHUNK = 1 << 18
_MASK64 = (1 << 64) - 1


def chunk_seed(base: int, index: int) -> int:
    """Seed of chunk ``index`` of a step whose seed is ``base``: SplitMix64's mixing of
    ``base + (index + 1) * golden``, distinct and well spread for neighbouring chunks."""
    z = (base + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _chunks(n: int, base: int, index: int) -> list[tuple[int, int, int]]:
    """``(start, stop, seed)`` of each :data:`NOISE_CHUNK` of ``n`` values, the first chunk
    being chunk ``index`` of the step."""
    return [(a, min(a + NOISE_CHUNK, n), chunk_seed(base, index + k))
            for k, a in enumerate(range(0, n, NOISE_CHUNK))]


def _draws(like: list[Tensor], seed: int | None, step: int
           ) -> Iterator[tuple[Tensor, torch.Generator, list[tuple[int, int, int]] | None]]:
    """Per tensor of ``like``, in order: itself, the step's generator, and its chunks
    (``None``: drawn whole from the step's generator)."""
    base = step_seed(seed, step)
    gen = torch.Generator(device=like[0].device).manual_seed(base)
    index = 0
    for t in like:
        if t.device.type != "cpu" or t.numel() < PARALLEL_NOISE_MIN:
            yield t, gen, None
        else:
            chunks = _chunks(t.numel(), base, index)
            index += len(chunks)
            yield t, gen, chunks


def _fill_normal(job: tuple[Tensor, int]) -> None:
    part, seed = job
    part.normal_(generator=torch.Generator().manual_seed(seed))


_SCRATCH = threading.local()


def _add_normal(job: tuple[Tensor, int, float]) -> None:
    """``part += std * z``, ``z`` the chunk's normals, drawn into this thread's scratch."""
    part, seed, std = job
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.dtype != part.dtype or buf.numel() < part.numel():
        buf = _SCRATCH.buf = torch.empty(max(NOISE_CHUNK, part.numel()), dtype=part.dtype)
    z = buf[: part.numel()]
    _fill_normal((z, seed))
    part.add_(z, alpha=std)


def step_noise(like: list[Tensor], seed: int | None, step: int) -> Iterator[Tensor]:
    """Standard normal noise shaped like each tensor of ``like`` (its dtype and device), one
    tensor at a time, for step ``step``: a deterministic function of ``(seed, step)`` and
    the shapes, fresh from :mod:`secrets` when ``seed`` is None.

    A CPU tensor of :data:`PARALLEL_NOISE_MIN` values or more is drawn in chunks of
    :data:`NOISE_CHUNK` by ``torch.get_num_threads()`` threads; the others come from the
    step's generator (:func:`step_generator`) in turn.
    """
    if not like:
        return
    for t, gen, chunks in _draws(like, seed, step):
        if chunks is None:
            yield torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
            continue
        z = torch.empty(t.shape, dtype=t.dtype)
        flat = z.view(-1)
        thread_map(_fill_normal, [(flat[lo:hi], s) for lo, hi, s in chunks])
        yield z


def add_step_noise(targets: list[Tensor], std: float, seed: int | None, step: int) -> None:
    """``t += std * z`` in place for each tensor ``t`` of ``targets``, ``z`` the noise
    :func:`step_noise` draws for it. A chunked tensor gets its noise chunk by chunk, through
    one :data:`NOISE_CHUNK` scratch buffer per thread: no temporary of its size (for an
    embedding table, tens of MB of freshly touched memory per step)."""
    if not targets:
        return
    for t, gen, chunks in _draws(targets, seed, step):
        if chunks is None:
            t.add_(torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype), alpha=std)
            continue
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        thread_map(_add_normal, [(flat[lo:hi], s, std) for lo, hi, s in chunks])
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(t.shape))


@register_aggregator("gaussian_noise")
def gaussian_noise(noise_multiplier: float, max_norm: float, expected_batch_size: float = 1.0,
                   *, seed: int | None = None) -> Aggregator:
    """Add ``N(0, (sigma C / L)^2)`` to every coordinate of a batch update (batch -> batch).

    Applied after :func:`normalized_sum` of gradients clipped to ``C``, this is Opacus's
    "noise ``N(0, sigma^2 C^2)`` on the sum, then divide by L".

    Args:
        noise_multiplier: sigma.
        max_norm: C, the clipping bound (the sensitivity of the sum).
        expected_batch_size: L; 1 gives noise on the sum itself.
        seed: ``None`` (default) draws each step's seed from :mod:`secrets`; an int makes
            the noise a deterministic function of ``(seed, step)`` (tests, research).

    State: the number of steps taken (an ``int``), so a resumed run continues the stream.
    """
    sigma, C, L = float(noise_multiplier), float(max_norm), float(expected_batch_size)
    if sigma < 0 or not C > 0 or not L > 0:
        raise ValueError(
            f"gaussian_noise: need noise_multiplier >= 0, max_norm > 0, expected_batch_size > 0; "
            f"got {sigma}, {C}, {L}"
        )
    std = sigma * C / L
    step_seed(seed, 0)  # a bad seed fails here, not at the first step

    def noised(grads: Grads, step: int, in_place: bool) -> Grads:
        """``u + std * noise`` per parameter, the noise drawn in ``grads``' order, into
        ``u``'s own buffer when ``in_place``, else into a copy: the same values either way."""
        out = dict(grads) if in_place else {n: u.clone() for n, u in grads.items()}
        if std != 0:
            add_step_noise(list(out.values()), std, seed, step)
        return out

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        return noised(grads, int(state), in_place=False), int(state) + 1

    def update_in_place(grads: Grads, state: State) -> State:
        noised(grads, int(state), in_place=True)
        return int(state) + 1

    return Aggregator(f"gaussian_noise(sigma={sigma:g}, C={C:g}, L={L:g})", lambda params: 0,
                      update, "batch", "batch", kind="gaussian_noise",
                      options={"noise_multiplier": sigma, "max_norm": C, "expected_batch_size": L},
                      update_in_place=update_in_place)


def _missing(state: State, names) -> list[str]:
    return [n for n in state if n not in names]


def _refuse(missing: list[str]) -> None:
    raise UnsupportedModelError(
        f"DP-SGD: no per-example gradients for {', '.join(missing[:5])}"
        f"{' ...' if len(missing) > 5 else ''}; every trainable parameter needs them for "
        "clipping. Freeze those parameters (requires_grad=False) or use the general "
        "torch.func engine."
    )


@register_aggregator("require_all_parameters")
def require_all_parameters() -> Aggregator:
    """Pass per-example gradients through, but refuse a batch that lacks any trainable
    parameter seen at ``init`` (a layer without per-example gradients would otherwise be
    updated -- or not -- outside the privacy analysis)."""

    def init(params: Grads) -> State:
        return tuple(params)

    def update(grads: Grads, state: State) -> tuple[Grads, State]:
        missing = _missing(state, grads)
        if missing:
            _refuse(missing)
        for n, g in grads.items():
            if n in state and g.ndim == 0:
                raise UnsupportedModelError(f"DP-SGD: gradient of '{n}' is not per-example")
        return grads, state

    # Layer-wise, every trainable parameter gets its norms from a layer rule or the
    # runner materializes the model; nothing to scale.
    return Aggregator("require_all_parameters", init, update, "per_example", "per_example",
                      kind="require_all_parameters", example_wise=True,
                      row_scale=RowScale(lambda norms_sq: {}, needs_norms=False))


@register_aggregator("dp_sgd")
def dp_sgd(max_norm: float, noise_multiplier: float, expected_batch_size: float, *,
           per_layer: bool = False, seed: int | None = None) -> Aggregator:
    """The DP-SGD update: check, clip to ``C``, sum, divide by ``L``, add noise.

    ``chain(require_all_parameters(), clip(C, per_layer), normalized_sum(L),
    gaussian_noise(sigma, C, L))``: per-example gradients in, one private update out.
    """
    return chain(
        require_all_parameters(),
        clip(max_norm, per_layer=per_layer),
        normalized_sum(expected_batch_size),
        gaussian_noise(noise_multiplier, max_norm, expected_batch_size, seed=seed),
    )
