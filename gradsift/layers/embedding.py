"""``nn.Embedding``: example ``i``'s gradient adds ``d_it`` to the row of token ``idx_it``.

``padding_idx`` rows stay zero; with ``scale_grad_by_freq`` each ``d_it`` is divided by
the count of its token in example ``i``'s indices of that call (as a single-example
backward pass would). Squared norms are ghost norms when ``T^2 < vocabulary``:
``sum_{t,s} [idx_t = idx_s] d_t . d_s``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Capture, Grads, LayerRule, own_trainable, register_layer_rule


def token_positions(cap: Capture) -> tuple[Tensor, Tensor]:
    """All calls as indices ``[B, T]`` and (scaled, padding-masked) output grads ``[B, T, dim]``."""
    m: nn.Embedding = cap.module  # type: ignore[assignment]
    idxs, ds = [], []
    for a, d in zip(cap.inputs, cap.grad_outputs):
        b = d.shape[0]
        idx = a.reshape(a.shape[0], -1).expand(b, -1)
        d = d.reshape(b, -1, m.embedding_dim)
        if m.scale_grad_by_freq:
            v = m.num_embeddings
            flat = idx + torch.arange(b, device=idx.device).unsqueeze(1) * v
            counts = torch.bincount(flat.reshape(-1), minlength=b * v)[flat]
            d = d / counts.unsqueeze(-1).to(d.dtype)
        idxs.append(idx)
        ds.append(d)
    idx, D = (idxs[0], ds[0]) if len(idxs) == 1 else (torch.cat(idxs, 1), torch.cat(ds, 1))
    if m.padding_idx is not None:
        D = D * (idx != m.padding_idx).unsqueeze(-1).to(D.dtype)
    return idx, D


@register_layer_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """``nn.Embedding`` with any ``padding_idx``, ``max_norm``, ``scale_grad_by_freq``, ``sparse``."""

    batch_axis_free = True
    feature_axes = 0

    def grads(self, cap: Capture) -> Grads:
        m: nn.Embedding = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        idx, D = token_positions(cap)
        b, v = idx.shape[0], m.num_embeddings
        flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
        g = D.new_zeros(b * v, m.embedding_dim).index_add_(0, flat, D.reshape(-1, m.embedding_dim))
        return {"weight": g.view(b, v, m.embedding_dim)}

    def weighted_sum(self, cap: Capture, weights: Tensor) -> Grads:
        m: nn.Embedding = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        idx, D = token_positions(cap)
        Dw = (D * weights.view(-1, 1, 1).to(D.dtype)).reshape(-1, m.embedding_dim)
        return {"weight": D.new_zeros(m.num_embeddings, m.embedding_dim).index_add_(0, idx.reshape(-1), Dw)}

    def norms_sq(self, cap: Capture) -> Grads:
        m: nn.Embedding = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        idx, D = token_positions(cap)
        t = idx.shape[1]
        if t * t < m.num_embeddings:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(D.dtype)
            return {"weight": (same * (D @ D.transpose(1, 2))).sum((1, 2))}
        return super().norms_sq(cap)

    def gram(self, cap: Capture) -> Grads:
        """``G[i, j] = sum_{t,s} [idx_it = idx_js] d_it . d_js`` when ``(B T)^2 < B V``."""
        m: nn.Embedding = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        idx, D = token_positions(cap)
        b, t = idx.shape
        if b * t * t < m.num_embeddings * m.embedding_dim:
            fi, fd = idx.reshape(-1), D.reshape(b * t, -1)
            prod = (fi.unsqueeze(1) == fi.unsqueeze(0)).to(D.dtype) * (fd @ fd.T)
            return {"weight": prod.view(b, t, b, t).sum((1, 3))}
        return super().gram(cap)


@register_layer_rule(nn.EmbeddingBag)
class EmbeddingBagRule(LayerRule):
    """``nn.EmbeddingBag`` on ``[B, L]`` bags (one per example): ``sum``, ``mean``, ``max``,
    ``per_sample_weights``, ``padding_idx``. The flat ``(input, offsets)`` form has no batch
    axis the trace can follow, so models using it run through torch.func."""

    def grads(self, cap: Capture) -> Grads:
        m: nn.EmbeddingBag = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        b, v, dim = cap.batch_size, m.num_embeddings, m.embedding_dim
        total = None
        for k, (idx, d) in enumerate(zip(cap.inputs, cap.grad_outputs)):
            args, kwargs = cap.args[k], cap.kwargs[k]
            if len(args) > 1 and args[1] is not None or kwargs.get("offsets") is not None:
                raise ValueError("EmbeddingBag with offsets is not supported by the hooks path")
            psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
            valid = torch.ones_like(idx, dtype=d.dtype) if m.padding_idx is None else \
                (idx != m.padding_idx).to(d.dtype)
            if m.mode == "max":
                rows = m.weight.detach()[idx]  # [B, L, dim]
                rows = rows.masked_fill(valid.unsqueeze(-1) == 0, float("-inf"))
                arg = rows.argmax(1)  # [B, dim]
                flat = idx.gather(1, arg)  # the chosen token per (example, dim)
                g = d.new_zeros(b, v, dim)
                g.scatter_add_(1, flat.unsqueeze(1), d.unsqueeze(1))
            else:
                w = valid if psw is None else valid * psw.to(d.dtype)
                if m.mode == "mean":
                    w = w / valid.sum(1, keepdim=True).clamp_min(1)
                contrib = d.unsqueeze(1) * w.unsqueeze(-1)  # [B, L, dim]
                flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
                g = d.new_zeros(b * v, dim).index_add_(0, flat, contrib.reshape(-1, dim)).view(b, v, dim)
            total = g if total is None else total + g
        return {"weight": total}
