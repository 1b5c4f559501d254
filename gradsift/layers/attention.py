"""``nn.MultiheadAttention`` as a whole: its input projections, ``bias_k``/``bias_v`` and ``out_proj``.

The layer computes ``Q = q W_q^T + b_q``, ``K = k W_k^T + b_k``, ``V = v W_v^T + b_v``
(``in_proj_weight`` stacks ``W_q; W_k; W_v``, or they are ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ), appends ``bias_k``/``bias_v`` and zero keys (``add_zero_attn``)
as extra key positions, attends per head (masks added to the scores) and projects the
heads' output ``O`` with ``out_proj`` (never called as a module, so this rule covers its
parameters). Example ``i``'s gradients are, as for Linear layers over positions,
``sum_t dQ_it q_it^T`` (and ``K``, ``V``), ``sum_t d_it O_it^T`` (``out_proj``), the
position sums of ``dQ``/``dK``/``dV``/``d`` (biases) and ``dK``/``dV`` at the appended
position (``bias_k``/``bias_v``).

The rule gets ``dQ``, ``dK``, ``dV`` and ``O`` from the recording itself: its forward pass
runs the attention written out (:meth:`AttentionRule.record_forward`) and its backward
pass also takes the gradients of the projections, so nothing is run again. A layer
recorded otherwise (unbatched, ``is_causal`` without a mask) has them by re-running the
attention on the recorded (batch-first) inputs and masks and back-propagating the
recorded gradients of the output (and of the returned attention weights): one batched
pass, exact. Handled:
``batch_first`` either way, ``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn``,
``key_padding_mask`` (bool or float, ``[B, S]``), ``attn_mask`` (``[T, S]`` shared, or
``[B * heads, T, S]`` traced to the inputs), ``need_weights`` and ``average_attn_weights``.
Dropout on the attention weights in training mode is not (its random mask is not
recorded): the engine then uses torch.func.

PyTorch's fused fast path (``torch._native_multi_head_attention``, also taken by
``nn.TransformerEncoderLayer`` in eval mode) runs only when no gradient is needed, so it
never runs while gradients are recorded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (Capture, Grads, LayerRule, outer_norms_sq, own_trainable, register_layer_rule,
                   shared_or_batch, sum_of_squares)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (``True`` = not allowed) as ``-inf``/0, a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are views of the same values (query, key and value of self-attention)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _get(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name, default)


@register_layer_rule(nn.MultiheadAttention)
class AttentionRule(LayerRule):
    """``nn.MultiheadAttention``: in-projections (packed or separate), ``bias_k``/``bias_v``,
    ``out_proj``; every option but attention dropout in training mode."""

    multi_output = True

    def supports(self, module: nn.Module) -> bool:
        return not (module.training and module.dropout > 0) and type(module.out_proj) in (
            nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)

    def unsupported_reason(self, module: nn.Module) -> str:
        return ("AttentionRule does not cover attention dropout in training mode (its random mask is not "
                "recorded); call model.eval() or set dropout=0 (torch.func is used otherwise)")

    def parameters(self, module: nn.Module) -> dict[str, Tensor]:
        own = own_trainable(module)
        own.update({f"out_proj.{n}": p for n, p in own_trainable(module.out_proj).items()})
        return own

    # ------------------------------------------------------------------ recording

    def output_tensors(self, output: Any) -> list[Tensor]:
        out, weights = output
        return [out] if weights is None else [out, weights]

    def output_tags(self, module: nn.Module, in_tag: Any, outputs: list[Tensor]) -> list[Any] | str:
        axis = 0 if module.batch_first else 1
        if in_tag != (axis, 1) or outputs[0].ndim != 3:
            return (f"its query has the batch on axis {in_tag[0]}, but batch_first={module.batch_first} "
                    f"means axis {axis} of a [B, T, E] / [T, B, E] query")
        return [(axis, 1)] + [(0, 1)] * (len(outputs) - 1)

    def check_call(self, module, args, kwargs, tag, batch) -> str | None:
        axis = 0 if module.batch_first else 1
        for pos, name in ((1, "key"), (2, "value")):
            t = _get(args, kwargs, pos, name)
            if not isinstance(t, Tensor) or tag(t) != (axis, 1):
                return f"its {name} is not a [B, S, d] / [S, B, d] tensor traced to the inputs"
        kpm = _get(args, kwargs, 3, "key_padding_mask")
        if isinstance(kpm, Tensor) and not shared_or_batch(kpm, tag(kpm), 0, batch):
            return "its key_padding_mask is not [B, S] traced to the inputs"
        mask = _get(args, kwargs, 5, "attn_mask")
        if isinstance(mask, Tensor):
            mt = tag(mask)
            if mask.ndim == 2 and mt is not None:
                return "its 2-D attn_mask [T, S] depends on the inputs (give a [B * heads, T, S] mask)"
            if mask.ndim == 3 and mt != (0, module.num_heads) and not (mt is None and batch == 1):
                return "its 3-D attn_mask is not [B * heads, T, S] traced to the inputs"
        return None

    # ------------------------------------------------------------------ replay

    def _inputs(self, m: nn.MultiheadAttention, cap: Capture, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key, value ``[B, T|S, d]`` of call ``k``."""
        args, kwargs = cap.args[k], cap.kwargs[k]
        key, value = _get(args, kwargs, 1, "key"), _get(args, kwargs, 2, "value")
        if not m.batch_first:
            key, value = key.transpose(0, 1), value.transpose(0, 1)
        return cap.inputs[k], key, value

    def _mask(self, m: nn.MultiheadAttention, args: tuple, kwargs: dict, q: Tensor, key: Tensor) -> Tensor | None:
        """The additive score mask ``[B|1, H|1, T, S]`` of a call (``q``, ``key`` batch first)."""
        b, t, s = q.shape[0], q.shape[1], key.shape[1]
        mask = None
        am = _float_mask(_get(args, kwargs, 5, "attn_mask"), q.dtype)
        if am is not None:
            mask = am.view(1, 1, t, s) if am.ndim == 2 else am.view(b, m.num_heads, t, s)
        kpm = _float_mask(_get(args, kwargs, 3, "key_padding_mask"), q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(-1, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        return mask

    def _attend(self, m: nn.MultiheadAttention, q: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                detach: bool) -> dict[str, Any]:
        """The attention of ``nn.MultiheadAttention`` written out (inputs batch first).

        Returns:
            ``Q``, ``K``, ``V`` (projections ``[B, T|S, E]``, requiring grad), ``extra``
            (``bias_k``/``bias_v`` expanded to ``[B, 1, E]``, requiring grad, or ``[]``),
            ``O`` (heads' output ``[B, T, E]``), ``P`` (attention ``[B, H, T, S]``) and
            ``out`` (the output ``[B, T, E]``, without ``out_proj``'s bias when ``detach``).
        """
        e, h = m.embed_dim, m.num_heads
        hd = e // h
        b, t = q.shape[:2]

        def par(p: Tensor | None) -> Tensor | None:
            return None if p is None else (p.detach() if detach else p)

        if m._qkv_same_embed_dim:
            wq, wk, wv = par(m.in_proj_weight).chunk(3)
        else:
            wq, wk, wv = par(m.q_proj_weight), par(m.k_proj_weight), par(m.v_proj_weight)
        bq = bk = bv = None
        if m.in_proj_bias is not None:
            bq, bk, bv = par(m.in_proj_bias).chunk(3)
        Q, K, V = F.linear(q, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        if detach:
            Q, K, V = Q.requires_grad_(), K.requires_grad_(), V.requires_grad_()
        Kx, Vx, extra = K, V, []
        if m.bias_k is not None:
            bk_ = par(m.bias_k).reshape(1, 1, e).expand(b, 1, e).clone()
            bv_ = par(m.bias_v).reshape(1, 1, e).expand(b, 1, e).clone()
            if detach:
                bk_, bv_ = bk_.requires_grad_(), bv_.requires_grad_()
            Kx, Vx, extra = torch.cat([K, bk_], 1), torch.cat([V, bv_], 1), [bk_, bv_]
            mask = None if mask is None else F.pad(mask, (0, 1))
        Qh = Q.view(b, t, h, hd).transpose(1, 2)
        Kh = Kx.view(b, -1, h, hd).transpose(1, 2)
        Vh = Vx.view(b, -1, h, hd).transpose(1, 2)
        if m.add_zero_attn:
            Kh = torch.cat([Kh, Kh.new_zeros(b, h, 1, hd)], 2)
            Vh = torch.cat([Vh, Vh.new_zeros(b, h, 1, hd)], 2)
            mask = None if mask is None else F.pad(mask, (0, 1))
        scores = (Qh * hd ** -0.5) @ Kh.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        P = scores.softmax(-1)
        O = (P @ Vh).transpose(1, 2).reshape(b, t, e)
        out = F.linear(O, par(m.out_proj.weight), None if detach else par(m.out_proj.bias))
        return {"Q": Q, "K": K, "V": V, "extra": extra, "O": O, "P": P, "out": out}

    def _replay(self, m: nn.MultiheadAttention, cap: Capture, k: int) -> dict[str, Tensor]:
        """Back-propagate call ``k``'s recorded gradients through the attention (or take
        what the recording's own forward kept, :meth:`record_forward`).

        Returns:
            ``q``, ``k``, ``v`` (inputs ``[B, T|S, d]``), ``dQ``, ``dK``, ``dV`` (``[B, T|S, E]``),
            ``O`` (heads' output ``[B, T, E]``), ``d`` (output gradient ``[B, T, E]``) and, with
            ``bias_k``, ``dbias_k``/``dbias_v`` ``[B, E]``.
        """
        q, key, value = self._inputs(m, cap, k)
        d_out = cap.grad_outputs[k]
        kept = cap.replays[k] if k < len(cap.replays) else None
        e, b = m.embed_dim, q.shape[0]
        if kept and "grads" in kept:
            z = [torch.zeros(shape, **kw) if g is None else g.detach()
                 for g, (shape, kw) in zip(kept["grads"], kept["like"])]
            O = kept["O"]
        else:
            d_weights = cap.extra_grads[k][0] if cap.extra_grads and cap.extra_grads[k] else None
            average = _get(cap.args[k], cap.kwargs[k], 6, "average_attn_weights", True)
            mask = self._mask(m, cap.args[k], cap.kwargs[k], q, key)
            with torch.enable_grad():
                r = self._attend(m, q, key, value, mask, detach=True)
                outs, grads = [r["out"]], [d_out]
                if d_weights is not None:
                    outs.append(r["P"].mean(1) if average else r["P"])
                    grads.append(d_weights)
                wrt = [r["Q"], r["K"], r["V"], *r["extra"]]
                got = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
            z = [torch.zeros_like(x) if g is None else g for g, x in zip(got, wrt)]
            O = r["O"].detach()
        res = {"q": q, "k": key, "v": value, "dQ": z[0], "dK": z[1], "dV": z[2], "O": O, "d": d_out}
        if len(z) > 3:
            res["dbias_k"], res["dbias_v"] = z[3].reshape(b, e), z[4].reshape(b, e)
        return res

    def record_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict] | None:
        """The forward pass of a recording: the attention written out (:meth:`_attend`), the
        gradients of its projections kept as the backward pass computes them, so that the
        rule does not run it again (:meth:`_replay`). ``None`` (the layer's own forward)
        for an unbatched call.

        Returns:
            the layer's output, as ``nn.MultiheadAttention`` gives it, and the holder: ``O``;
            ``grad_of``, the projections ``Q``, ``K``, ``V`` (and ``bias_k``/``bias_v``
            expanded), whose gradients the recording's backward pass puts in ``grads``.
        """
        query, key, value = _get(args, kwargs, 0, "query"), _get(args, kwargs, 1, "key"), _get(args, kwargs, 2, "value")
        if not all(isinstance(t, Tensor) and t.ndim == 3 for t in (query, key, value)):
            return None
        if _get(args, kwargs, 7, "is_causal", False) and _get(args, kwargs, 5, "attn_mask") is None:
            return None  # the layer's own forward says what is missing
        if not module.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        need_weights = _get(args, kwargs, 4, "need_weights", True)
        average = _get(args, kwargs, 6, "average_attn_weights", True)
        with torch._C.DisableTorchFunction():
            r = self._attend(module, query, key, value, self._mask(module, args, kwargs, query, key), detach=False)
        inner = [r["Q"], r["K"], r["V"], *r["extra"]]
        like = [(t.shape, {"dtype": t.dtype, "device": t.device}) for t in inner]
        holder: dict[str, Any] = {"O": r["O"].detach(), "like": like,
                                  "grad_of": [t for t in inner if t.requires_grad]}
        if len(holder["grad_of"]) != len(inner):  # frozen projections: replayed
            holder["grad_of"] = []
        out = r["out"] if module.batch_first else r["out"].transpose(0, 1)
        weights = None
        if need_weights:
            weights = r["P"].mean(1) if average else r["P"]
        return (out, weights), holder

    # ------------------------------------------------------------------ results

    def _each_call(self, cap: Capture):
        for k in range(len(cap.inputs)):
            yield self._replay(cap.module, cap, k)

    def _parts(self, m: nn.MultiheadAttention, own: dict[str, Tensor], r: dict[str, Tensor]
               ) -> dict[str, list[tuple[Tensor, Tensor | None]]]:
        """One call's parameters (those in ``own``) -> their parts ``(d [B, T, O], x [B, T, K])``:
        example ``i``'s gradient is the parts' ``sum_t d_t x_t^T`` (``sum_t d_t`` where ``x`` is
        None) concatenated along the output axis (``in_proj_weight``: the Q, K, V blocks)."""
        blocks = [("dQ", "q"), ("dK", "k"), ("dV", "v")]
        parts: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        if m._qkv_same_embed_dim:
            parts["in_proj_weight"] = [(r[d], r[a]) for d, a in blocks]
        else:
            for (d, a), n in zip(blocks, ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                parts[n] = [(r[d], r[a])]
        parts["in_proj_bias"] = [(r[d], None) for d, _ in blocks]
        if "dbias_k" in r:
            parts["bias_k"] = [(r["dbias_k"].unsqueeze(1), None)]
            parts["bias_v"] = [(r["dbias_v"].unsqueeze(1), None)]
        parts["out_proj.weight"] = [(r["d"], r["O"])]
        parts["out_proj.bias"] = [(r["d"], None)]
        return {n: p for n, p in parts.items() if n in own}

    def grads(self, cap: Capture) -> Grads:
        m = cap.module
        own = self.parameters(m)
        total: Grads = {}
        for r in self._each_call(cap):
            for n, terms in self._parts(m, own, r).items():
                g = _per_example(terms)
                g = g.reshape(g.shape[0], *own[n].shape)
                total[n] = total[n] + g if n in total else g
        return total

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        """Writes each parameter's per-example gradients straight into ``out`` (one call, not
        accumulating; self-attention's ``in_proj_weight`` with one ``bmm``), else as
        :meth:`grads`."""
        if accumulate or len(cap.inputs) != 1 or not all(t.is_contiguous() for t in out.values()):
            return super().grads_into(cap, out, accumulate)
        m = cap.module
        parts = self._parts(m, self.parameters(m), next(self._each_call(cap)))
        for n, terms in parts.items():
            _per_example(terms, out=out[n].flatten(1) if terms[0][1] is None else out[n])
        return set(parts)

    def weighted_sum(self, cap: Capture, weights: Tensor) -> Grads:
        """``sum_i w_i g_i`` as one matrix product per part over all examples' positions (no
        ``[B, 3E, E]`` per-example gradients)."""
        m = cap.module
        own = self.parameters(m)
        total: Grads = {}
        for r in self._each_call(cap):
            w = weights.to(r["d"].dtype).view(-1, 1, 1)
            for n, terms in self._parts(m, own, r).items():
                sums = []
                for d, x in terms:
                    wd = (d * w).flatten(0, 1)  # [B*T, O]
                    sums.append(wd.sum(0) if x is None else wd.T @ x.flatten(0, 1))
                g = torch.cat(sums, 0).reshape(own[n].shape)
                total[n] = total[n] + g if n in total else g
        return total

    def norms_sq(self, cap: Capture) -> Grads:
        """Ghost norms where cheaper (:func:`~gradsift.layers.base.outer_norms_sq`) of one
        call's parts; several calls take the default (their gradients add up first)."""
        m = cap.module
        if len(cap.inputs) != 1:
            return super().norms_sq(cap)
        parts = self._parts(m, self.parameters(m), next(self._each_call(cap)))
        return {n: sum(sum_of_squares(d.sum(1), 1) if x is None else outer_norms_sq(d, x) for d, x in terms)
                for n, terms in parts.items()}


def _per_example(terms: list[tuple[Tensor, Tensor | None]], out: Tensor | None = None) -> Tensor:
    """Example ``i``'s gradient from a parameter's parts (see :meth:`AttentionRule._parts`):
    ``[B, sum O, K]`` (``[B, sum O]`` for a bias), into ``out`` when given. Parts that share
    one input (self-attention's Q, K, V) take one batched product of their stacked ``d``."""
    x0 = terms[0][1]
    if x0 is not None and all(x is not None and _same(x, x0) for _, x in terms):
        d = torch.cat([d for d, _ in terms], 2) if len(terms) > 1 else terms[0][0]
        return torch.bmm(d.transpose(1, 2), x0) if out is None else torch.bmm(d.transpose(1, 2), x0, out=out)
    g = torch.cat([d.sum(1) if x is None else torch.bmm(d.transpose(1, 2), x) for d, x in terms], 1)
    return g if out is None else out.copy_(g)
