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

from .base import Capture, Grads, LayerRule, own_trainable, register_layer_rule, shared_or_batch
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

    def grads(self, cap: Capture) -> Grads:
        m = cap.module
        own = own_trainable(m)
        total: Grads = {}
        for k, (x, d_out) in enumerate(zip(cap.inputs, cap.grad_outputs)):
            args, kwargs = cap.args[k], cap.kwargs[k]
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            if hx is not None:  # [layers * directions, B, H] by construction
                hx = tuple(h.movedim(1, 0) for h in hx) if isinstance(hx, tuple) else hx.movedim(1, 0)
            packed = args[0] if args and isinstance(args[0], PackedSequence) else kwargs.get("input")
            lengths = None
            if isinstance(packed, PackedSequence):
                lengths = PackedLayout(packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices).lengths()
            replayed = self._replay(m, x, hx, d_out, cap.extra_grads[k], lengths)
            for sfx, (a, dgi, prev, dgh, unit, dhp) in replayed.items():
                terms = {
                    "weight_ih" + sfx: lambda: torch.einsum("btg,bti->bgi", dgi, a),
                    "bias_ih" + sfx: lambda: dgi.sum(1),
                    "weight_hh" + sfx: lambda: torch.einsum("btg,bth->bgh", dgh, prev),
                    "bias_hh" + sfx: lambda: dgh.sum(1),
                    "weight_hr" + sfx: lambda: torch.einsum("btp,bth->bph", dhp, unit),
                }
                for n, term in terms.items():
                    if n in own:
                        g = term()
                        total[n] = total[n] + g if n in total else g
        return total
