"""``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` by their cell decomposition.

At every step ``t`` of layer ``l`` and direction ``r`` a recurrent layer computes
``gi_t = W_ih x_t + b_ih`` and ``gh_t = W_hh h_{t-1} + b_hh`` and combines them in the
cell (tanh/ReLU, GRU gates, LSTM gates). So, as for a Linear layer over ``T``
positions, example ``i``'s gradients are ``sum_t dgi_it x_it^T`` (``W_ih``),
``sum_t dgh_it h_i,t-1^T`` (``W_hh``) and the sums of ``dgi``/``dgh`` (biases).

The rule gets ``dgi``/``dgh`` by re-running the layer in Python, on the recorded input
and initial state, and back-propagating the recorded output gradients (of the output
sequence, ``h_n`` and ``c_n``) through it: one batched pass, exact. Multi-layer,
bidirectional, ``batch_first`` either way and packed sequences (``pack_padded_sequence``,
``enforce_sorted`` either way) and an LSTM's ``proj_size`` (``h = W_hr (o * tanh(c))``,
whose gradient is ``sum_t dh_t (o * tanh(c))_t^T``) are covered. Dropout between layers in
training mode is not: its random masks are drawn inside the fused kernel and cannot be
replayed, so the rule declines (``layers.explain`` says so) and the engine uses torch.func.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .base import (Capture, Grads, LayerRule, outer_norms_sq, own_trainable, register_layer_rule,
                   shared_or_batch, sum_of_squares)
from .trace import PackedLayout


def _cell(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step: ``gi``, ``gh`` ``[B, G*H]``, state ``h`` (``c``) ``[B, H]`` -> new ``h`` (``c``)."""
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    i, f, g, o = (gi + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _lstm_forward_steps(
    gi: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor, act: Tensor, tcs: Tensor, prev_h: Tensor, prev_c: Tensor,
    out: Tensor, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """One direction's steps without masks or projection, writing into preallocated
    ``act [T, B, 4H]``, ``tcs``, ``prev_h``, ``prev_c`` and ``out`` (time-major); 7 ops a step.

    Returns:
        the last ``h`` and ``c`` ``[B, H]``.
    """
    t, hsz = act.shape[0], act.shape[2] // 4
    gis, acts, tcl, outl = gi.unbind(1), act.unbind(0), tcs.unbind(0), out.unbind(0)
    cs = torch.empty_like(tcs)
    csl = cs.unbind(0)
    a_i, a_f, a_g, a_o = (act[..., j * hsz : (j + 1) * hsz].unbind(0) for j in range(4))
    gates = gi.new_empty(gi.shape[0], 4 * hsz)
    gates_g = gates[:, 2 * hsz : 3 * hsz]
    order = range(t - 1, -1, -1) if reverse else range(t)
    h0, c0 = h, c
    for s in order:
        torch.addmm(gis[s], h, w_hh_t, out=gates)
        torch.sigmoid(gates, out=acts[s])
        torch.tanh(gates_g, out=a_g[s])
        c = torch.addcmul(a_f[s] * c, a_i[s], a_g[s], out=csl[s])
        h = torch.mul(a_o[s], torch.tanh(c, out=tcl[s]), out=outl[s])
    if reverse:
        prev_h[:-1], prev_h[-1] = out[1:], h0
        prev_c[:-1], prev_c[-1] = cs[1:], c0
    else:
        prev_h[0], prev_h[1:] = h0, out[:-1]
        prev_c[0], prev_c[1:] = c0, cs[:-1]
    return h, c


def _lstm_backward_steps(
    dy: Tensor, dh: Tensor, dc: Tensor, k_c: Tensor, k_ifg: Tensor, k_o: Tensor, f: Tensor, w_hh: Tensor,
    dg_all: Tensor, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """One direction's backward steps without masks or projection, writing the gate
    gradients into ``dg_all [B, T, 4H]``; 6 ops a step.

    Args:
        dy: ``[B, T, H]`` output gradients; dh, dc: ``[B, H]`` gradients of the last state;
        k_c, k_o, f: ``[T, B, H]``; k_ifg: ``[T, B, 3, H]`` (see :func:`_lstm_backward`).

    Returns:
        the gradients of the initial ``h`` and ``c``.
    """
    b, t, g4 = dg_all.shape
    hsz = g4 // 4
    if t == 0:
        return dh, dc
    dyl, kc, kifg, ko, fl = dy.unbind(1), k_c.unbind(0), k_ifg.unbind(0), k_o.unbind(0), f.unbind(0)
    dgl = dg_all.unbind(1)
    dg_ifg = dg_all[:, :, : 3 * hsz].unflatten(2, (3, hsz)).unbind(1)
    dg_o = dg_all[:, :, 3 * hsz :].unbind(1)
    order = list(range(t)) if reverse else list(range(t - 1, -1, -1))
    dh_new = dh + dyl[order[0]]
    for j, s in enumerate(order):
        dc_tot = torch.addcmul(dc, dh_new, kc[s])
        torch.mul(dc_tot.unsqueeze(1), kifg[s], out=dg_ifg[s])
        torch.mul(dh_new, ko[s], out=dg_o[s])
        dh_new = torch.addmm(dyl[order[j + 1]], dgl[s], w_hh) if j + 1 < t else dgl[s] @ w_hh
        dc = dc_tot * fl[s]
    return dh_new, dc


def _lstm_forward(
    module: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, masks: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, list[dict]]:
    """An LSTM's forward pass by hand, keeping what :func:`_lstm_backward` needs.

    Args:
        x: ``[B, T, in]``; h0 ``[B, L*D, P]`` (``P`` = ``proj_size`` or ``H``); c0 ``[B, L*D, H]``.
        masks: ``[B, T, 1]`` (true where step ``t`` is within example ``i``'s length) or ``None``.

    Returns:
        the output ``[B, T, D*P]``, ``h_n [B, L*D, P]``, ``c_n [B, L*D, H]`` and the saved steps.
    """
    b, t = x.shape[:2]
    dirs = 2 if module.bidirectional else 1
    hsz = module.hidden_size
    psz = getattr(module, "proj_size", 0) or hsz
    w = {n: p.detach() for n, p in module.named_parameters()}
    layer_in = x
    saved: list[dict] = []
    h_last, c_last = [], []
    for layer in range(module.num_layers):
        outs = []
        for r in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if r else "")
            w_ih, w_hh, w_hr = w["weight_ih" + sfx], w["weight_hh" + sfx], w.get("weight_hr" + sfx)
            gi = layer_in @ w_ih.T
            if "bias_ih" + sfx in w:
                gi = gi + (w["bias_ih" + sfx] + w["bias_hh" + sfx])
            k = layer * dirs + r
            h, c = h0[:, k], c0[:, k]
            act = gi.new_empty(t, b, 4 * hsz)
            tcs = gi.new_empty(t, b, hsz)
            prev_h = gi.new_empty(t, b, psz)
            prev_c = gi.new_empty(t, b, hsz)
            units = gi.new_empty(t, b, hsz) if w_hr is not None else None
            out = gi.new_zeros(t, b, psz)
            w_hh_t = w_hh.T
            if masks is None and w_hr is None:  # the common case: fewer, preallocated ops a step
                h, c = _lstm_forward_steps(gi, h, c, w_hh_t, act, tcs, prev_h, prev_c, out, r == 1)
                outs.append(out)
                h_last.append(h)
                c_last.append(c)
                saved.append({"sfx": sfx, "k": k, "r": r, "in": layer_in, "act": act, "tc": tcs, "ph": prev_h,
                              "pc": prev_c, "u": units, "w_ih": w_ih, "w_hh": w_hh, "w_hr": w_hr})
                continue
            for s in (range(t - 1, -1, -1) if r else range(t)):
                prev_h[s], prev_c[s] = h, c
                gates = torch.addmm(gi[:, s], h, w_hh_t)
                a = act[s]
                torch.sigmoid(gates, out=a)
                torch.tanh(gates[:, 2 * hsz : 3 * hsz], out=a[:, 2 * hsz : 3 * hsz])
                i, f, g, o = a.chunk(4, 1)
                c_new = torch.addcmul(f * c, i, g)
                tc = torch.tanh(c_new, out=tcs[s])
                h_new = o * tc
                if w_hr is not None:
                    units[s] = h_new
                    h_new = h_new @ w_hr.T
                if masks is None:
                    h, c = h_new, c_new
                    out[s] = h_new
                else:
                    m = masks[:, s]
                    h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                    torch.mul(h_new, m, out=out[s])
            outs.append(out)
            h_last.append(h)
            c_last.append(c)
            saved.append({"sfx": sfx, "k": k, "r": r, "in": layer_in, "act": act, "tc": tcs, "ph": prev_h,
                          "pc": prev_c, "u": units, "w_ih": w_ih, "w_hh": w_hh, "w_hr": w_hr})
        layer_in = (outs[0] if dirs == 1 else torch.cat(outs, 2)).transpose(0, 1)
    return layer_in, torch.stack(h_last, 1), torch.stack(c_last, 1), saved


def _lstm_backward(
    module: nn.LSTM, saved: list[dict], d_out: Tensor, dh_n: Tensor, dc_n: Tensor, masks: Tensor | None,
    need_dx: bool = False,
) -> tuple[dict, Tensor | None, Tensor, Tensor]:
    """Back-propagation through time by hand (no autograd graph) from :func:`_lstm_forward`.

    Args:
        d_out: ``[B, T, D*P]``; dh_n ``[B, L*D, P]``; dc_n ``[B, L*D, H]``.

    Returns:
        per direction, as :meth:`RecurrentRule._replay` (``dgh`` is ``dgi``: the gates are
        ``gi + gh``); the input gradient ``[B, T, in]`` (with ``need_dx``); ``dh0``, ``dc0``.
    """
    b, t = d_out.shape[:2]
    dirs = 2 if module.bidirectional else 1
    hsz = module.hidden_size
    psz = getattr(module, "proj_size", 0) or hsz
    dh0, dc0 = torch.empty_like(dh_n), torch.empty_like(dc_n)
    result = {}
    d_layer = d_out
    for layer in range(module.num_layers - 1, -1, -1):
        d_below = None
        for sv in saved[layer * dirs : (layer + 1) * dirs]:
            r, k, act, tcs = sv["r"], sv["k"], sv["act"], sv["tc"]
            # step-local factors, for all steps at once: the recurrence below is 6 small ops a step
            i, f, g, o = act.chunk(4, 2)  # [T, B, H] each
            k_c = o * (1 - tcs * tcs)  # dc += dh * k_c
            k_ifg = torch.stack([g * i * (1 - i), sv["pc"] * f * (1 - f), i * (1 - g * g)], 2)  # [T, B, 3, H]
            k_o = tcs * o * (1 - o)
            dy = d_layer[..., r * psz : (r + 1) * psz]
            dh, dc = dh_n[:, k], dc_n[:, k]
            dg_all = act.new_empty(b, t, 4 * hsz)
            dhp = act.new_empty(b, t, psz) if sv["w_hr"] is not None else None
            w_hh, w_hr = sv["w_hh"], sv["w_hr"]
            if masks is None and w_hr is None:
                dh, dc = _lstm_backward_steps(dy, dh, dc, k_c, k_ifg, k_o, f, w_hh, dg_all, r == 1)
            for s in (range(t) if r else range(t - 1, -1, -1)) if not (masks is None and w_hr is None) else ():
                if masks is None:
                    dh_new, dc_new = dh + dy[:, s], dc
                else:
                    m = masks[:, s].to(act.dtype)
                    dh_new, dc_new = m * (dh + dy[:, s]), m * dc
                if dhp is not None:
                    dhp[:, s] = dh_new
                    dh_new = dh_new @ w_hr
                dc_tot = torch.addcmul(dc_new, dh_new, k_c[s])
                dg = dg_all[:, s]
                torch.mul(dc_tot.unsqueeze(1), k_ifg[s], out=dg[:, : 3 * hsz].view(b, 3, hsz))
                torch.mul(dh_new, k_o[s], out=dg[:, 3 * hsz :])
                dh_prev, dc_prev = dg @ w_hh, dc_tot * f[s]
                if masks is None:
                    dh, dc = dh_prev, dc_prev
                else:
                    dh, dc = dh_prev + (1 - m) * dh, dc_prev + (1 - m) * dc
            dh0[:, k], dc0[:, k] = dh, dc
            if layer > 0 or need_dx:
                dx = dg_all @ sv["w_ih"]
                d_below = dx if d_below is None else d_below + dx
            units = sv["u"].transpose(0, 1) if sv["u"] is not None else None
            result[sv["sfx"]] = (sv["in"], dg_all, sv["ph"].transpose(0, 1), dg_all, units, dhp)
        d_layer = d_below
    return result, d_layer, dh0, dc0


def _lstm_bptt(
    module: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, d_out: Tensor, d_states: tuple[Tensor, ...],
    masks: Tensor | None,
) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]:
    """An LSTM's forward and backward through time, by hand: :func:`_lstm_forward` then
    :func:`_lstm_backward` (arguments as there; ``d_states`` is ``(dh_n, dc_n)``)."""
    saved = _lstm_forward(module, x, h0, c0, masks)[3]
    return _lstm_backward(module, saved, d_out, d_states[0], d_states[1], masks)[0]


def _per_example(d: Tensor, x: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``sum_t d_t x_t^T`` per example (``d [B, T, O]``, ``x [B, T, K]`` -> ``[B, O, K]``), or
    ``sum_t d_t`` (``[B, O]``) for a bias (``x`` None); into ``out`` when given."""
    if x is None:
        return d.sum(1) if out is None else torch.sum(d, 1, out=out)
    return torch.bmm(d.transpose(1, 2), x) if out is None else torch.bmm(d.transpose(1, 2), x, out=out)


class _RecordedLSTM(torch.autograd.Function):
    """The LSTM of a recording pass: :func:`_lstm_forward`, and a backward that keeps the
    per-step gate gradients for the rule (so the layer is not run again)."""

    @staticmethod
    def forward(ctx, holder: dict, module: nn.LSTM, x: Tensor, h0: Tensor, c0: Tensor, *params: Tensor):
        with torch._C.DisableTorchFunction():
            out, h_n, c_n, saved = _lstm_forward(module, x.detach(), h0.detach(), c0.detach(), None)
        ctx.holder, ctx.module, ctx.saved = holder, module, saved
        ctx.n_params = len(params)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out: Tensor, dh_n: Tensor, dc_n: Tensor):
        result, dx, dh0, dc0 = _lstm_backward(ctx.module, ctx.saved, d_out, dh_n, dc_n, None, need_dx=True)
        ctx.holder["result"] = result
        ctx.saved = None
        return (None, None, dx, dh0, dc0) + (None,) * ctx.n_params


@register_layer_rule(nn.RNN, nn.GRU, nn.LSTM)
class RecurrentRule(LayerRule):
    """``nn.RNN`` (tanh, ReLU), ``nn.GRU``, ``nn.LSTM``: any layers, directions, ``batch_first``."""

    multi_output = True

    def supports(self, module: nn.Module) -> bool:
        return not (module.training and module.dropout > 0 and module.num_layers > 1)

    def unsupported_reason(self, module: nn.Module) -> str:
        return ("RecurrentRule does not cover dropout between layers in training mode (its random mask "
                "is not recorded); call model.eval() or set dropout=0 (torch.func is used otherwise)")

    def check_call(self, module, args, kwargs, tag, batch) -> str | None:
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        for h in (hx if isinstance(hx, tuple) else (hx,)):
            if isinstance(h, Tensor) and not shared_or_batch(h, tag(h), 1, batch):
                return "its initial state is not [layers * directions, B, H] traced to the inputs"
        return None

    def record_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict] | None:
        """The forward pass of a recording, for an LSTM on a padded (not packed) input: by hand,
        so that its backward pass keeps the gate gradients the rule needs (see
        :class:`_RecordedLSTM`); ``None`` for the layer's own forward.

        Returns:
            the layer's output, as ``nn.LSTM`` gives it, and a holder that the backward pass
            fills (``holder["result"]``, read by :meth:`grads`).
        """
        x = args[0] if args else kwargs.get("input")
        if module.mode != "LSTM" or not isinstance(x, Tensor) or x.ndim != 3:
            return None
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        xb = x if module.batch_first else x.transpose(0, 1)
        b, ld = xb.shape[0], module.num_layers * (2 if module.bidirectional else 1)
        if hx is None:
            h0 = xb.new_zeros(b, ld, getattr(module, "proj_size", 0) or module.hidden_size)
            c0 = xb.new_zeros(b, ld, module.hidden_size)
        else:
            h0, c0 = hx[0].transpose(0, 1), hx[1].transpose(0, 1)
        holder: dict = {}
        params = [p for p in module.parameters() if p.requires_grad]
        out, h_n, c_n = _RecordedLSTM.apply(holder, module, xb, h0, c0, *params)
        out = out if module.batch_first else out.transpose(0, 1)
        return (out, (h_n.transpose(0, 1), c_n.transpose(0, 1))), holder

    def output_tensors(self, output: Any) -> list[Tensor]:
        out, state = output
        states = list(state) if isinstance(state, tuple) else [state]
        return [out.data if isinstance(out, PackedSequence) else out, *states]

    def output_tags(self, module: nn.Module, in_tag: Any, outputs: list[Tensor]) -> list[Any] | str:
        axis = 0 if module.batch_first else 1
        if isinstance(in_tag, PackedLayout):  # the output is packed like the input; states [L*D, B, H]
            return [in_tag] + [(1, 1)] * (len(outputs) - 1)
        if in_tag != (axis, 1) or outputs[0].ndim != 3:
            return (f"its input has the batch on axis {in_tag[0]}, but batch_first={module.batch_first} "
                    f"means axis {axis}")
        return [(axis, 1)] + [(1, 1)] * (len(outputs) - 1)

    def _replay(
        self, module: nn.Module, x: Tensor, hx: Any, d_out: Tensor, d_states: tuple[Tensor, ...],
        lengths: Tensor | None = None,
    ) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Re-run the layer on ``x [B, T, in]`` (initial state ``[B, layers*dirs, H]``) and
        back-propagate the recorded gradients.

        With ``lengths [B]`` (a packed sequence, padded), example ``i`` runs only its first
        ``lengths[i]`` steps: the state is carried unchanged over the others, as packing does
        (a reverse direction starts at the example's last step).

        Returns:
            per direction suffix (``"_l0"``, ``"_l0_reverse"``, ...): the layer's input
            ``[B, T, in]``, ``dgi [B, T, G*H]``, the previous states ``[B, T, H]`` and
            ``dgh [B, T, G*H]`` (steps in processing order).
        """
        b, t = x.shape[:2]
        dirs = 2 if module.bidirectional else 1
        hsz, mode = module.hidden_size, module.mode
        proj = getattr(module, "proj_size", 0)
        lstm = mode == "LSTM"
        if hx is None:
            h0 = x.new_zeros(b, module.num_layers * dirs, proj or hsz)
            c0 = x.new_zeros(b, module.num_layers * dirs, hsz) if lstm else None
        elif lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if lstm:
            masks = None
            if lengths is not None:
                masks = (torch.arange(t, device=x.device).unsqueeze(0) < lengths.to(x.device).unsqueeze(1)).unsqueeze(-1)
            with torch.no_grad():
                return _lstm_bptt(module, x.detach(), h0.detach(), c0.detach(), d_out, d_states, masks)
        weights = {n: p.detach() for n, p in module.named_parameters()}
        ins: dict[str, Tensor] = {}
        gis: dict[str, Tensor] = {}
        ghs: dict[str, list[Tensor]] = {}
        prevs: dict[str, list[Tensor]] = {}
        units: dict[str, list[Tensor]] = {}  # with proj_size: the unprojected h (o * tanh(c))
        projs: dict[str, list[Tensor]] = {}  # and the projected h
        h_last, c_last = [], []
        layer_in = x.detach()
        masks = None
        if lengths is not None:
            steps = torch.arange(t, device=x.device)
            masks = (steps.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)).unsqueeze(-1)  # [B, T, 1]
        with torch.enable_grad():
            for layer in range(module.num_layers):
                outs = []
                for r in range(dirs):
                    sfx = f"_l{layer}" + ("_reverse" if r else "")
                    w_ih, w_hh = weights["weight_ih" + sfx], weights["weight_hh" + sfx]
                    b_ih, b_hh = weights.get("bias_ih" + sfx), weights.get("bias_hh" + sfx)
                    ins[sfx] = layer_in.detach()
                    gi_all = layer_in @ w_ih.T
                    if b_ih is not None:
                        gi_all = gi_all + b_ih
                    if not gi_all.requires_grad:
                        gi_all = gi_all.detach().requires_grad_()
                    gis[sfx] = gi_all
                    k = layer * dirs + r
                    h, c = h0[:, k].detach(), (c0[:, k].detach() if lstm else None)
                    seq: list[Tensor] = [h] * t
                    ghs[sfx], prevs[sfx], units[sfx], projs[sfx] = [], [], [], []
                    w_hr = weights.get("weight_hr" + sfx)
                    for s in (range(t - 1, -1, -1) if r else range(t)):
                        gh = h @ w_hh.T
                        if b_hh is not None:
                            gh = gh + b_hh
                        if not gh.requires_grad:
                            gh = gh.detach().requires_grad_()
                        ghs[sfx].append(gh)
                        prevs[sfx].append(h.detach())
                        h_new, c_new = _cell(mode, gi_all[:, s], gh, h, c)
                        if w_hr is not None:
                            units[sfx].append(h_new.detach())
                            h_new = h_new @ w_hr.T
                            projs[sfx].append(h_new)
                        if masks is None:
                            h, c = h_new, c_new
                            seq[s] = h
                        else:
                            m = masks[:, s]
                            h = torch.where(m, h_new, h)
                            c = torch.where(m, c_new, c) if lstm else None
                            seq[s] = torch.where(m, h_new, torch.zeros_like(h_new))
                    outs.append(torch.stack(seq, 1))
                    h_last.append(h)
                    if lstm:
                        c_last.append(c)
                layer_in = outs[0] if dirs == 1 else torch.cat(outs, 2)
            final = [layer_in, torch.stack(h_last, 1)] + ([torch.stack(c_last, 1)] if lstm else [])
            wanted = list(gis.values()) + [g for sfx in gis for g in ghs[sfx] + projs[sfx]]
            grads = torch.autograd.grad(final, wanted, [d_out, *d_states], allow_unused=True)
        result = {}
        rest = list(grads[len(gis):])
        for (sfx, gi), dgi in zip(gis.items(), grads[: len(gis)]):
            n, n_p = len(ghs[sfx]), len(projs[sfx])
            dgh = [torch.zeros_like(h) if g is None else g for g, h in zip(rest[:n], ghs[sfx])]
            dhp = [torch.zeros_like(h) if g is None else g for g, h in zip(rest[n : n + n_p], projs[sfx])]
            rest = rest[n + n_p :]
            result[sfx] = (
                ins[sfx], torch.zeros_like(gi) if dgi is None else dgi,
                torch.stack(prevs[sfx], 1), torch.stack(dgh, 1),
                torch.stack(units[sfx], 1) if n_p else None, torch.stack(dhp, 1) if n_p else None,
            )
        return result

    def _calls(self, cap: Capture):
        """Per call: per direction suffix, ``(a, dgi, prev, dgh, unit, dhp)`` (see :meth:`_replay`)."""
        m = cap.module
        for k, (x, d_out) in enumerate(zip(cap.inputs, cap.grad_outputs)):
            holder = cap.replays[k] if k < len(cap.replays) else None
            if holder and "result" in holder:  # the recording's backward pass kept them
                yield holder["result"]
                continue
            args, kwargs = cap.args[k], cap.kwargs[k]
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            if hx is not None:  # [layers * directions, B, H] by construction
                hx = tuple(h.movedim(1, 0) for h in hx) if isinstance(hx, tuple) else hx.movedim(1, 0)
            packed = args[0] if args and isinstance(args[0], PackedSequence) else kwargs.get("input")
            lengths = None
            if isinstance(packed, PackedSequence):
                lengths = PackedLayout(packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices).lengths()
            yield self._replay(m, x, hx, d_out, cap.extra_grads[k], lengths)

    def grads_into(self, cap: Capture, out: Grads, accumulate: bool = False) -> set[str]:
        """Writes each weight's ``sum_t dg_t a_t^T`` with ``bmm(..., out=)`` into ``out`` (one call,
        not accumulating), else adds :meth:`grads`."""
        if accumulate or len(cap.inputs) != 1 or not all(t.is_contiguous() for t in out.values()):
            return super().grads_into(cap, out, accumulate)
        products = self._products(cap)
        for n, [(d, x)] in products.items():  # one call: one term each
            _per_example(d, x, out=out[n])
        return set(products)

    def _products(self, cap: Capture) -> dict[str, list[tuple[Tensor, Tensor | None]]]:
        """Parameter name -> per call and direction ``(d [B, T, O], x [B, T, K])``, its
        per-example gradient being ``sum over them of sum_t d_t x_t^T`` (``x`` is ``None``
        for a bias: ``sum_t d_t``)."""
        own = own_trainable(cap.module)
        out: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        for replayed in self._calls(cap):
            for sfx, (a, dgi, prev, dgh, unit, dhp) in replayed.items():
                for n, d, x in (("weight_ih", dgi, a), ("bias_ih", dgi, None), ("weight_hh", dgh, prev),
                                ("bias_hh", dgh, None), ("weight_hr", dhp, unit)):
                    if n + sfx in own:
                        out.setdefault(n + sfx, []).append((d, x))
        return out

    def norms_sq(self, cap: Capture) -> Grads:
        """Ghost norms where cheaper (:func:`~gradsift.layers.base.outer_norms_sq`, the calls'
        steps concatenated): no ``[B, 4H, K]`` per-example gradient."""
        out: Grads = {}
        for n, terms in self._products(cap).items():
            if terms[0][1] is None:
                out[n] = sum_of_squares(sum(d.sum(1) for d, _ in terms), 1)
            else:
                d = torch.cat([d for d, _ in terms], 1) if len(terms) > 1 else terms[0][0]
                x = torch.cat([x for _, x in terms], 1) if len(terms) > 1 else terms[0][1]
                out[n] = outer_norms_sq(d, x)
        return out

    def weighted_sum(self, cap: Capture, weights: Tensor) -> Grads:
        """``sum_i w_i g_i`` as one matrix product over all examples' steps."""
        out: Grads = {}
        for n, terms in self._products(cap).items():
            total = None
            for d, x in terms:
                wd = d * weights.to(d.dtype).view(-1, 1, 1)
                g = wd.sum((0, 1)) if x is None else wd.flatten(0, 1).T @ x.flatten(0, 1)
                total = g if total is None else total + g
            out[n] = total
        return out

    def grads(self, cap: Capture) -> Grads:
        total: Grads = {}
        for n, terms in self._products(cap).items():
            for d, x in terms:
                g = _per_example(d, x)
                total[n] = total[n] + g if n in total else g
        return total
