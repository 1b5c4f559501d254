"""``nn.Embedding``: example ``i``'s gradient adds ``d_it`` to the row of token ``idx_it``.

``padding_idx`` rows stay zero; with ``scale_grad_by_freq`` each ``d_it`` is divided by
the count of its token in example ``i``'s indices of that call (as a single-example
backward pass would). Squared norms are ghost norms when ``T^2 < vocabulary``:
``sum_{t,s} [idx_t = idx_s] d_t . d_s``; otherwise the ``d_it`` are summed per distinct
(example, token) pair (``[<= B T, dim]``, never ``[B, V, dim]``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Capture, Grads, LayerRule, own_trainable, register_layer_rule, sum_of_squares


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

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        """Scatter-adds into ``out["weight"]`` ``[B, V, dim]`` (zeroed first unless
        ``accumulate``): no ``B x V x dim`` temporary and no copy."""
        m: nn.Embedding = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return set()
        idx, D = token_positions(cap)
        b, v = idx.shape[0], m.num_embeddings
        target = out["weight"]
        if not target.is_contiguous():
            return super().grads_into(cap, out, accumulate)
        if not accumulate:
            target.zero_()
        flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
        target.view(b * v, m.embedding_dim).index_add_(0, flat, D.reshape(-1, m.embedding_dim).to(target.dtype))
        return {"weight"}

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
        b, t = idx.shape
        if t * t < m.num_embeddings:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(D.dtype)
            return {"weight": (same * (D @ D.transpose(1, 2))).sum((1, 2))}
        # Each example's gradient has one row per distinct token: sum d over the positions
        # of each (example, token) pair, never forming the [B, V, dim] gradients.
        v = m.num_embeddings
        keys = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
        pairs, which = torch.unique(keys, return_inverse=True)
        rows = D.new_zeros(pairs.shape[0], m.embedding_dim).index_add_(0, which, D.reshape(-1, m.embedding_dim))
        per_pair = sum_of_squares(rows, 1)
        return {"weight": D.new_zeros(b).index_add_(0, torch.div(pairs, v, rounding_mode="floor"), per_pair)}

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


def _bags(m: nn.EmbeddingBag, cap: Capture, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Call ``k``'s bags as ``idx [B, L]``, ``filled [B, L]`` (a real entry) and the
    ``per_sample_weights [B, L]`` (or ``None``); the flat ``(input, offsets)`` form is padded."""
    args, kwargs = cap.args[k], cap.kwargs[k]
    idx = cap.inputs[k]
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    if idx.ndim == 2:
        return idx, torch.ones_like(idx, dtype=torch.bool), psw
    # flat [N] with offsets: bag j is rows offsets[j] .. offsets[j+1] - 1 (checked to be example j's)
    off = offsets.to(idx.device).long()
    end = int(off[-1]) if m.include_last_offset else idx.shape[0]
    starts = off[:-1] if m.include_last_offset else off
    b = starts.shape[0]
    rows = torch.arange(end, device=idx.device)
    bag = torch.searchsorted(starts, rows, right=True) - 1
    pos = rows - starts[bag]
    width = int(pos.max()) + 1 if end else 1
    padded = idx.new_zeros(b, width)
    filled = torch.zeros(b, width, dtype=torch.bool, device=idx.device)
    padded[bag, pos] = idx[:end]
    filled[bag, pos] = True
    if psw is not None:
        w = psw.new_zeros(b, width)
        w[bag, pos] = psw[:end]
        psw = w
    return padded, filled, psw


@register_layer_rule(nn.EmbeddingBag)
class EmbeddingBagRule(LayerRule):
    """``nn.EmbeddingBag``, every mode (``sum``, ``mean``, ``max``), ``per_sample_weights``,
    ``padding_idx``: on ``[B, L]`` bags (one per example), or on the flat ``(input [N],
    offsets [B])`` form (``include_last_offset`` either way) when the batch trace shows that
    bag ``j`` holds only example ``j``'s entries (e.g. ``tokens[mask]``, or a flattened
    ``[B, L]`` tensor with ``offsets = arange(B) * L``)."""

    #: takes a flat input whose examples are given by its offsets (see :mod:`.record`)
    flat_input = True

    def grads(self, cap: Capture) -> Grads:
        m: nn.EmbeddingBag = cap.module  # type: ignore[assignment]
        if not cap.inputs or "weight" not in own_trainable(m):
            return {}
        b, v, dim = cap.batch_size, m.num_embeddings, m.embedding_dim
        total = None
        for k, d in enumerate(cap.grad_outputs):
            idx, filled, psw = _bags(m, cap, k)
            valid = filled if m.padding_idx is None else filled & (idx != m.padding_idx)
            valid = valid.to(d.dtype)
            if m.mode == "max":
                rows = m.weight.detach()[idx].to(d.dtype)  # [B, L, dim]
                rows = rows.masked_fill(valid.unsqueeze(-1) == 0, float("-inf"))
                arg = rows.argmax(1)  # [B, dim]
                flat = idx.gather(1, arg)  # the chosen token per (example, dim)
                any_valid = (valid.sum(1, keepdim=True) > 0).to(d.dtype)  # an empty bag has no gradient
                g = d.new_zeros(b, v, dim)
                g.scatter_add_(1, flat.unsqueeze(1), (d * any_valid).unsqueeze(1))
            else:
                w = valid if psw is None else valid * psw.to(d.dtype)
                if m.mode == "mean":
                    w = w / valid.sum(1, keepdim=True).clamp_min(1)
                contrib = d.unsqueeze(1) * w.unsqueeze(-1)  # [B, L, dim]
                flat = (idx + torch.arange(b, device=idx.device).unsqueeze(1) * v).reshape(-1)
                g = d.new_zeros(b * v, dim).index_add_(0, flat, contrib.reshape(-1, dim)).view(b, v, dim)
            total = g if total is None else total + g
        return {"weight": total}
