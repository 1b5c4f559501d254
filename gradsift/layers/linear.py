"""``nn.Linear``, and the shared rule for layers that are a matrix product per position.

For a layer computing ``out_t = W a_t (+ b)`` at positions ``t`` (a sequence's tokens,
a convolution's output pixels), example ``i``'s gradient is ``sum_t d_it a_it^T``
(Goodfellow 2015). Its squared norm is ``<A A^T, D D^T>_F`` (ghost norm; for one
position ``||a||^2 ||d||^2``), computed without the ``[out, in]`` matrix when that is
cheaper (``T^2 (in + out) < T in out``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ..workspace import acquire
from .base import (Capture, Grads, LayerRule, outer_norms_sq, own_trainable, register_layer_rule,
                   sum_of_squares)

#: Elements of one per-example gradient block in :meth:`MatmulRule.reduced` (4 MB of float32).
BLOCK_ELEMENTS = 1 << 20


class MatmulRule(LayerRule):
    """A layer that is a (grouped) matrix product per position; subclasses give :meth:`positions`.

    The weight has shape ``[O, K]`` per group (reshaped to the parameter's shape) and
    the bias ``[O]``.
    """

    def positions(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        """One call as ``A [B, G, T, K]`` (inputs per position) and ``D [B, G, T, O]``."""
        raise NotImplementedError

    def to_param(self, g: Tensor, param: Tensor) -> Tensor:
        """``[..., G, O/G, K]`` weight values to ``[..., *param.shape]`` (default: reshape)."""
        return g.reshape(*g.shape[:-3], *param.shape)

    def stacked(self, cap: Capture) -> tuple[Tensor, Tensor]:
        """All calls as ``A [B, G, T, K]`` and ``D [B, G, T, O]`` (positions concatenated)."""
        parts = [self.positions(cap.module, a, d) for a, d in zip(cap.inputs, cap.grad_outputs)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def grads(self, cap: Capture) -> Grads:
        own = own_trainable(cap.module)
        if not cap.inputs:
            return {}
        A, D = self.stacked(cap)
        out: Grads = {}
        if "weight" in own:
            g = torch.matmul(D.transpose(2, 3), A)  # [B, G, O/G, K]
            out["weight"] = self.to_param(g, own["weight"])
        if "bias" in own:
            out["bias"] = D.sum(2).reshape(D.shape[0], -1)
        return out

    def as_matrix(self, w: Tensor, groups: int) -> Tensor | None:
        """A writable view ``[B, G, O/G, K]`` of per-example weight values ``w``
        ``[B, *param.shape]`` laid out as :meth:`to_param` lays them, or ``None`` (default:
        the inverse of the reshape)."""
        b, o = w.shape[0], w.shape[1]
        if b == 0 or o == 0:
            return None
        try:
            return w.view(b, groups, o // groups, w[0].numel() // o)
        except RuntimeError:
            return None

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        """Writes ``D^T A`` straight into ``out`` (an elementwise outer product when each
        example has one position, a batched matmul otherwise): no ``[B, O, K]`` temporary."""
        own = own_trainable(cap.module)
        if not cap.inputs:
            return set()
        A, D = self.stacked(cap)
        b, groups, t, k = A.shape
        written: set[str] = set()
        if "weight" in own:
            w = out["weight"]
            W = self.as_matrix(w, groups) if w.dtype == A.dtype == D.dtype else None
            Dt = D.transpose(2, 3)  # [B, G, O/G, T]
            if W is None or W.shape != (b, groups, D.shape[3], k):
                g = self.to_param(torch.matmul(Dt, A), own["weight"])
                w.add_(g) if accumulate else w.copy_(g)
            elif t == 1:
                if accumulate:
                    W.addcmul_(Dt, A)
                else:
                    torch.mul(Dt, A, out=W)
            elif W.is_contiguous():
                W3 = W.view(b * groups, D.shape[3], k)
                Dt3, A3 = Dt.reshape(b * groups, D.shape[3], t), A.reshape(b * groups, t, k)
                if accumulate:
                    W3.baddbmm_(Dt3, A3)
                else:
                    torch.bmm(Dt3, A3, out=W3)
            else:
                g = torch.matmul(Dt, A)
                W.add_(g) if accumulate else W.copy_(g)
            written.add("weight")
        if "bias" in own:
            g = D.sum(2).reshape(b, -1) if t > 1 else D.reshape(b, -1)
            out["bias"].add_(g) if accumulate else out["bias"].copy_(g)
            written.add("bias")
        return written

    def weighted_sum(self, cap: Capture, weights: Tensor) -> Grads:
        own = own_trainable(cap.module)
        if not cap.inputs:
            return {}
        A, D = self.stacked(cap)
        b, groups, t, k = A.shape
        o = D.shape[3]
        w = weights.to(D.dtype)
        out: Grads = {}
        if groups == 1 and A.is_contiguous() and D.is_contiguous():
            # one matrix product over all positions; the weights scale the narrower side
            A2, D2 = A.view(b * t, k), D.view(b * t, o)
            wr = (w if t == 1 else w.repeat_interleave(t)).unsqueeze(1)  # [B*T, 1]
            if "weight" in own:
                g = D2.T @ (A2 * wr) if k <= o else (D2 * wr).T @ A2
                out["weight"] = self.to_param(g.unsqueeze(0), own["weight"])
            if "bias" in own:
                out["bias"] = (D2.T @ wr).reshape(-1)
            return out
        wv = w.view(-1, 1, 1, 1)
        if "weight" in own:
            g = torch.einsum("bgto,bgtk->gok", D * wv, A) if o <= k else torch.einsum("bgto,bgtk->gok", D, A * wv)
            out["weight"] = self.to_param(g, own["weight"])
        if "bias" in own:
            out["bias"] = torch.einsum("bgto,b->go", D, w).reshape(-1)
        return out

    def norms_sq(self, cap: Capture) -> Grads:
        own = own_trainable(cap.module)
        if not cap.inputs:
            return {}
        A, D = self.stacked(cap)
        out: Grads = {}
        t = A.shape[2]
        if t == 1:  # |g_i|^2 = |a_i|^2 |d_i|^2 per group; the bias's is |d_i|^2
            d_sq = sum_of_squares(D)  # [B, G]
            if "weight" in own:
                out["weight"] = (sum_of_squares(A) * d_sq).sum(1)
            if "bias" in own:
                out["bias"] = d_sq.sum(1)
            return out
        if "weight" in own:
            out["weight"] = outer_norms_sq(D, A)
        if "bias" in own:
            out["bias"] = sum_of_squares(D.sum(2), 1)
        return out

    def gram(self, cap: Capture) -> Grads:
        """``G[i, j] = sum_g sum_{t,s} (a_it . a_js)(d_it . d_js)``, never forming the gradients."""
        own = own_trainable(cap.module)
        if not cap.inputs:
            return {}
        A, D = self.stacked(cap)
        b, g, t, k = A.shape
        o = D.shape[3]
        out: Grads = {}
        d_gram = None  # [G, B*T, B*T] output-gradient Gram, shared by weight and bias
        if "weight" in own:
            if t * t * b < k * o:
                # [G, B*T, K] x [G, K, B*T] -> elementwise product of the two Grams
                Af = A.transpose(0, 1).reshape(g, b * t, k)
                Df = D.transpose(0, 1).reshape(g, b * t, o)
                d_gram = Df @ Df.transpose(1, 2)
                prod = (Af @ Af.transpose(1, 2)) * d_gram
                out["weight"] = prod.view(g, b, t, b, t).sum((0, 2, 4))
            else:
                flat = torch.matmul(D.transpose(2, 3), A).reshape(b, -1)
                out["weight"] = flat @ flat.T
        if "bias" in own:
            if d_gram is not None:
                # sum_t sum_s d_it . d_js: the blocks of the Gram already formed
                out["bias"] = d_gram.view(g, b, t, b, t).sum((0, 2, 4))
            else:
                s = D.sum(2).reshape(b, -1)
                out["bias"] = s @ s.T
        return out

    def reduced(
        self,
        cap: Capture,
        reducer: Callable[[Tensor], Tensor],
        factors: Callable[[str], Tensor | None],
    ) -> Grads | None:
        """Forms the weight's per-example gradients a block of output channels at a time.

        About :data:`BLOCK_ELEMENTS` values per block, written into one reused scratch
        buffer (:mod:`gradsift.workspace`), so the block stays in cache, its pages are not
        fresh each time, and no ``B x layer`` tensor is ever allocated. When the reducer
        has a ``rows`` form (``[n, B] -> [n]``, see
        :class:`gradsift.aggregate.base.PerCoordinate`) and each example has one position,
        the block is formed coordinate-major (``[r, K, B]``: every coordinate's B values
        contiguous), so the reducer needs no transpose.
        """
        own = own_trainable(cap.module)
        if not cap.inputs:
            return {}
        A, D = self.stacked(cap)
        b, groups, t, k = A.shape
        o = D.shape[3]
        out: Grads = {}
        if "weight" in own:
            f = factors("weight")
            Dw = D if f is None else D * f.view(-1, 1, 1, 1).to(D.dtype)
            rows = getattr(reducer, "rows", None)
            if rows is not None and groups == 1 and t == 1:
                w = self._reduced_rows(A, Dw, rows, getattr(reducer, "outer", None))
            else:
                w = self._reduced_blocks(A, Dw, reducer)
            if w is None:
                return None
            out["weight"] = self.to_param(w, own["weight"])
        if "bias" in own:
            f = factors("bias")
            g = D.sum(2).reshape(b, -1)
            if f is not None:
                g = g * f.view(-1, 1).to(g.dtype)
            if not bool(torch.isfinite(g.sum())):
                return None
            out["bias"] = reducer(g)
        return out

    def _reduced_blocks(self, A: Tensor, Dw: Tensor, reducer: Callable[[Tensor], Tensor]) -> Tensor | None:
        """``[G, O/G, K]`` from batch-first blocks ``[B, G, r, K]`` of per-example gradients."""
        b, groups, t, k = A.shape
        o = Dw.shape[3]
        w = Dw.new_empty(groups, o, k)
        rows = max(1, min(o, BLOCK_ELEMENTS // max(1, b * groups * k)))
        scratch = acquire(b * groups * rows * k, dtype=Dw.dtype, device=Dw.device, kind="scratch")
        same = A.dtype == Dw.dtype
        for start in range(0, o, rows):
            r = min(rows, o - start)
            Dt = Dw[..., start : start + r].transpose(2, 3)  # [B, G, r, T]
            if not same:
                g = torch.matmul(Dt, A)
            else:
                g = scratch[: b * groups * r * k].view(b, groups, r, k)
                if t == 1:
                    torch.mul(Dt, A, out=g)
                else:
                    torch.matmul(Dt, A, out=g)
            if not bool(torch.isfinite(g.sum())):
                return None
            w[:, start : start + r] = reducer(g)
        return w

    def _reduced_rows(self, A: Tensor, Dw: Tensor, rows_fn: Callable[[Tensor], Tensor],
                      outer: Callable[[Tensor, Tensor], Tensor | None] | None = None) -> Tensor | None:
        """``[1, O, K]`` from coordinate-major blocks ``[r, K, B]`` (one group, one position):
        ``block[o, k, i] = d_io a_ik``, an elementwise outer product over contiguous rows;
        or, when the reducer has an ``outer`` form that applies, from ``outer(D, A)``
        without any block (see :class:`gradsift.aggregate.base.PerCoordinate`)."""
        b, k, o = A.shape[0], A.shape[3], Dw.shape[3]
        # Products of finite factors are finite unless they overflow: check once, not per block.
        check_blocks = not _products_finite(Dw, A)
        if outer is not None and not check_blocks:
            w = outer(Dw.reshape(b, o), A.reshape(b, k).to(Dw.dtype))
            if w is not None:
                return w.view(1, o, k)
        Dt = Dw.reshape(b, o).T.contiguous()  # [O, B]
        At = A.reshape(b, k).T.to(Dw.dtype).contiguous()  # [K, B]
        w = Dw.new_empty(1, o, k)
        rows = max(1, min(o, BLOCK_ELEMENTS // max(1, k * b)))
        scratch = acquire(rows * k * b, dtype=Dw.dtype, device=Dw.device, kind="scratch")
        for start in range(0, o, rows):
            r = min(rows, o - start)
            block = scratch[: r * k * b].view(r, k, b)
            torch.mul(Dt[start : start + r, None, :], At[None], out=block)
            if check_blocks and not bool(torch.isfinite(block.sum())):
                return None
            w[0, start : start + r] = rows_fn(block.view(r * k, b)).view(r, k)
        return w


def _products_finite(x: Tensor, y: Tensor) -> bool:
    """Whether every product ``x_i * y_j`` is finite: both finite, and ``max|x| max|y|``
    below the dtype's largest value (one pass over each, no ``B x P`` check)."""
    if x.numel() == 0 or y.numel() == 0:
        return True
    mx, my = x.abs().max(), y.abs().max()
    if not bool(torch.isfinite(mx) & torch.isfinite(my)):
        return False
    return float(mx) * float(my) < torch.finfo(x.dtype).max


@register_layer_rule(nn.Linear)
class LinearRule(MatmulRule):
    """``nn.Linear`` on ``[B, ..., in]``: every position along the middle axes is one ``t``."""

    batch_axis_free = True

    def positions(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = a.shape[0]
        return a.reshape(b, 1, -1, module.in_features), d.reshape(b, 1, -1, module.out_features)


@register_layer_rule("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """GPT-2's ``Conv1D``: a Linear whose weight is stored ``[in, out]`` (``nx``, ``nf``)."""

    def positions(self, module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = a.shape[0]
        return a.reshape(b, 1, -1, module.nx), d.reshape(b, 1, -1, module.nf)

    def to_param(self, g: Tensor, param: Tensor) -> Tensor:
        return g.reshape(*g.shape[:-3], param.shape[1], param.shape[0]).transpose(-1, -2)

    def as_matrix(self, w: Tensor, groups: int) -> Tensor | None:
        return w.transpose(-1, -2).unsqueeze(1)
