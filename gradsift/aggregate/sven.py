"""Sven: singular value descent ("Sven: Singular Value Descent as a Computationally
Efficient Natural Gradient Method", Bright-Thonney, Harvey, Lukas & Thaler, 2026).

Each example's loss is a condition to satisfy. With ``J`` the ``[B, P]`` Jacobian of the
per-example losses ``r = (l_1, ..., l_B)`` with respect to the P parameters (row i is
example i's flattened gradient), Sven's direction is the minimum-norm ``d`` that best
solves the linearized conditions ``J d = r``::

    d = pinv_k(J) r = V_k diag(s_k / (s_k^2 + damping)) U_k^T r

from a rank-k truncated SVD ``J ~ U_k diag(s_k) V_k^T``; singular values below
``rcond * s_max`` are dropped. The optimizer then steps ``theta <- theta - lr * d`` (with
``lr = 1`` the linearized losses all reach 0 when J has full row rank). For
``B >= P`` this is Gauss-Newton on the losses (natural gradient, the under-parametrized
limit); for ``B < P`` the minimum-norm solution.

Two ways to get the factors (``method``):

* ``"gram"`` (default, exact): eigen-decompose the ``[B, B]`` Gram matrix ``J J^T`` in
  float64 (``U``, ``s^2``); then ``d = J^T U diag(1/(s^2 + damping)) U^T r``, so the
  ``P x k`` factor ``V`` is never formed. Cost ``O(B^2 P)``.
* ``"lowrank"``: randomized ``torch.svd_lowrank(J, q=rank, niter)``, cost ``O(k B P)``.

Use it as an aggregator: ``fit(..., aggregator="sven:rank=16")`` (it reads the
per-example losses, a side input declared in ``needs``) or call :func:`sven_direction`.

No layer-wise form: the direction needs the whole ``[B, P]`` Jacobian (its Gram matrix
could come from ghost Gram matrices, but ``J^T w`` is then one more weighted sum; not
done yet). No sharded form: the runner gathers every rank's rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Aggregator, Grads, State, check_finite, register_aggregator

__all__ = ["sven_direction", "sven"]


def _pinv_apply_gram(J: Tensor, r: Tensor, rank: int | None, rcond: float, damping: float) -> Tensor:
    J64 = J.double()
    evals, U = torch.linalg.eigh(J64 @ J64.T)  # ascending
    evals, U = evals.flip(0).clamp_min(0.0), U.flip(1)
    keep = _kept(evals.sqrt(), rank, rcond)
    s2 = evals[keep]
    w = U[:, keep] @ ((U[:, keep].T @ r.double()) / (s2 + damping))
    return (J64.T @ w).to(J.dtype)


def _pinv_apply_lowrank(J: Tensor, r: Tensor, rank: int | None, rcond: float, damping: float,
                        niter: int) -> Tensor:
    q = min(rank or min(J.shape), *J.shape)
    U, S, V = torch.svd_lowrank(J, q=q, niter=niter)
    keep = _kept(S, rank, rcond)
    U, S, V = U[:, keep], S[keep], V[:, keep]
    return V @ ((U.T @ r.to(J.dtype)) * (S / (S.square() + damping)))


def _kept(s: Tensor, rank: int | None, rcond: float) -> Tensor:
    """Indices of the singular values kept: the top ``rank`` (descending ``s``) that are
    above ``rcond * s_max`` (and above 0)."""
    n = s.shape[0] if rank is None else min(rank, s.shape[0])
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros(0, dtype=torch.long)
    ok = s[:n] > rcond * s[0]
    return torch.nonzero(ok).flatten()


def sven_direction(
    grads: Grads,
    losses: Tensor,
    *,
    rank: int | None = None,
    rcond: float = 1e-4,
    damping: float = 0.0,
    method: str = "gram",
    niter: int = 2,
) -> Grads:
    """Sven's direction ``pinv_k(J) r``.

    Args:
        grads: name -> ``[B, *shape]`` per-example gradients (the rows of J).
        losses: ``[B]`` per-example losses r.
        rank: k, the number of singular directions kept (``None``: all, up to ``min(B, P)``).
        rcond: drop singular values below ``rcond * s_max``.
        damping: lambda >= 0 in ``s / (s^2 + lambda)`` (Tikhonov / Levenberg-Marquardt).
        method: ``"gram"`` (exact, float64 Gram eigendecomposition) or ``"lowrank"``
            (``torch.svd_lowrank``, randomized).
        niter: power iterations for ``"lowrank"``.

    Returns:
        name -> ``param.shape``: d, to be written to ``.grad`` (the optimizer steps
        ``-lr * d``). An empty batch gives zeros.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"sven: rank must be >= 1, got {rank}")
    if rcond < 0 or damping < 0:
        raise ValueError(f"sven: rcond and damping must be >= 0, got {rcond}, {damping}")
    names = list(grads)
    shapes = [grads[n].shape[1:] for n in names]
    B = int(losses.shape[0])
    if any(grads[n].shape[0] != B for n in names):
        raise ValueError("sven: losses and per-example gradients disagree on the batch size")
    if B == 0:
        return {n: grads[n].new_zeros(s) for n, s in zip(names, shapes)}
    J = torch.cat([grads[n].flatten(1) for n in names], dim=1)  # [B, P]
    r = losses.detach().reshape(B).to(J.device)
    if method == "gram":
        d = _pinv_apply_gram(J, r, rank, rcond, damping)
    elif method == "lowrank":
        d = _pinv_apply_lowrank(J, r, rank, rcond, damping, niter)
    else:
        raise ValueError(f"sven: method must be 'gram' or 'lowrank', got '{method}'")
    out, start = {}, 0
    for n, s in zip(names, shapes):
        size = s.numel()
        out[n] = d[start : start + size].reshape(s)
        start += size
    return out


@register_aggregator("sven")
def sven(rank: int | None = None, rcond: float = 1e-4, damping: float = 0.0,
         method: str = "gram", niter: int = 2) -> Aggregator:
    """Sven as an aggregator: per-example gradients + losses -> ``pinv_k(J) r``.

    Needs the side input ``losses`` (``[B]``), which :func:`gradsift.fit` passes; by hand:
    ``gs.aggregate.apply(agg, grads, state, losses=losses)``. See :func:`sven_direction`.
    Spec: ``sven:rank=16,rcond=1e-4,damping=0``.
    """
    rank = None if rank is None else int(rank)
    if rank is not None and rank < 1:
        raise ValueError(f"sven: rank must be >= 1, got {rank}")
    if method not in ("gram", "lowrank"):
        raise ValueError(f"sven: method must be 'gram' or 'lowrank', got '{method}'")
    kw = dict(rank=rank, rcond=float(rcond), damping=float(damping), method=method, niter=int(niter))

    def update(grads: Grads, state: State, losses: Tensor) -> tuple[Grads, State]:
        check_finite(grads, "sven")
        return sven_direction(grads, losses, **kw), state

    name = f"sven(rank={rank}, rcond={rcond:g}, damping={damping:g}, method={method})"
    return Aggregator(name, lambda params: (), update, "per_example", "batch", kind="sven",
                      options=kw, needs=("losses",))

