"""One forward and one backward pass recording each hooked layer's inputs and output grads."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_map

from ..errors import UnsupportedModelError
from ..inputs import Inputs, batch_size, call_model
from .base import Capture, rule_for
from .trace import UNKNOWN, BatchTrace, PackedLayout, Tag, to_batch_first

LossFn = Callable[[Any, Tensor], Tensor]


class NotHookable(UnsupportedModelError):
    """The model (or this batch) cannot use the hook path; use the torch.func path."""


@dataclass(frozen=True)
class OutputRef:
    """A recorded layer output without its values: the autograd edge its gradient flows
    into, taken at the call (so a later in-place change of the output, e.g.
    ``ReLU(inplace=True)``, does not move it), and what a zero gradient needs. Holding the
    edge instead of the tensor lets the output's memory go once the network is done with
    it (a pre-activation after its ReLU), as in a plain forward pass."""

    edge: GradientEdge | None  # None: the output needs no gradient
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(output: Tensor) -> "OutputRef | None":
        """The reference, or ``None`` when the tensor must be held: a view of part of
        another tensor (an in-place change of the view re-routes the gradient around
        the view's edge). A view of a whole contiguous tensor (``Linear`` on ``[B, T,
        K]`` returns one) is referred to by its base's edge."""
        if not output.requires_grad:
            return OutputRef(None, output.shape, output.dtype, output.device)
        target = output
        if output._is_view():
            base = output._base
            if not (base.requires_grad and base.numel() == output.numel() and base.is_contiguous()
                    and output.is_contiguous()):
                return None
            target = base
        return OutputRef(get_gradient_edge(target), output.shape, output.dtype, output.device)

    @property
    def requires_grad(self) -> bool:
        return self.edge is not None

    def zeros(self) -> Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


def hooked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules owning trainable parameters that have a layer rule, by module name."""
    return {name: m for name, m in model.named_modules() if rule_for(m) is not None and rule_for(m).parameters(m)}


@dataclass
class Recording:
    """Result of :func:`record`: per-example losses, outputs and layer captures.

    Attributes:
        losses: ``[B]`` per-example losses (detached).
        outputs: the model's output (detached), as the model returned it.
        captures: layer name -> :class:`~gradsift.layers.Capture`.
    """

    losses: Tensor
    outputs: Any
    captures: dict[str, Capture]


#: Every this-many-th recording of a verified signature runs the full batch trace again.
RETRACE_EVERY = 100
#: Verified signatures kept per model (the most recently traced).
MAX_SIGNATURES = 8


@dataclass
class _Verified:
    """What a traced recording of one signature found, for replaying it without the trace.

    Attributes:
        calls: layer name -> per call ``(input tag, output tag, input shape, output shape)``;
            both tags ``None``: an input shared by all examples (``position_ids [1, T]``),
            whose output is broadcast over the batch.
        clone: outputs were handed on as copies (the model modifies one in place).
        loss_ref: a weak reference to the loss function (for a bound method, to its object),
            checked on use: its ``id`` in the signature is then not another's. Weak, so a
            loss that refers to the model does not keep the model alive through this cache.
        uses: recordings of this signature so far.
    """

    calls: dict[str, list[tuple[Tag, Tag, tuple[int, ...], tuple[int, ...]]]]
    clone: bool
    loss_ref: Any
    uses: int = 0


#: model -> signature -> what its traced recording found (see :func:`record`).
_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Verified]]" = weakref.WeakKeyDictionary()


class _Mismatch(Exception):
    """A replayed pass did not call the layers as the traced one did."""


def _leaf_signature(v: Any) -> Any:
    if isinstance(v, Tensor):
        return (tuple(v.shape), v.dtype, v.device, v.requires_grad)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, *(_leaf_signature(x) for x in v))
    if isinstance(v, dict):
        return ("dict", *((k, _leaf_signature(x)) for k, x in v.items()))
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise _Mismatch  # something the signature cannot describe: always trace


def _loss_target(loss_fn: LossFn) -> Any:
    """What identifies a loss function: the function, or a bound method's object."""
    return loss_fn.__self__ if inspect.ismethod(loss_fn) else loss_fn


def _signature(model: nn.Module, layers: dict[str, nn.Module], loss_fn: LossFn, loss_target: Any,
               inputs: Inputs, targets: Tensor) -> tuple | None:
    """Everything a traced recording's verdict depends on, short of the values: the layers,
    the trainable parameters, every module's train/eval mode, the loss function, autocast,
    and the structure, shapes, dtypes and devices of the inputs and targets (``None``:
    not describable, always trace)."""
    try:
        data = _leaf_signature((inputs, targets))
        weakref.ref(loss_target)
    except (_Mismatch, TypeError):  # TypeError: a loss that cannot be referred to weakly
        return None
    return (tuple((n, id(m), type(m)) for n, m in layers.items()),
            tuple(id(p) for p in model.parameters() if p.requires_grad),
            tuple(m.training for m in model.modules()),
            id(loss_target), getattr(loss_fn, "__func__", None), torch.is_autocast_enabled(), data)


def forget_traces(model: nn.Module) -> None:
    """Drop what :func:`record` verified for ``model`` (its next recording traces again)."""
    _VERIFIED.pop(model, None)


def _detach(x: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def record(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    layers: dict[str, nn.Module] | None = None,
    *,
    clone_outputs: bool = False,
) -> Recording:
    """One forward and one backward pass recording activations and output gradients.

    The pass runs under :class:`~gradsift.layers.trace.BatchTrace`, so every recorded
    tensor's batch axis is known (and moved to axis 0 in the captures), never guessed
    from its shape.

    Args:
        model: a hookable model (see :mod:`gradsift.layers`).
        loss_fn: ``(outputs, targets) -> [B]`` per-example losses.
        inputs: a tensor ``[B, ...]``, a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``) of tensors with the batch on dim 0.
        targets: ``[B, ...]``.
        layers: the layers to record (default :func:`hooked_layers`).
        clone_outputs: hand the network a copy of each layer output. Not needed for a
            model that changes a layer output in place (``ReLU(inplace=True)``): each
            output's gradient is taken at the autograd edge it had when its layer returned
            (:class:`OutputRef`).

    Raises:
        NotHookable: a trainable parameter is used outside its layer, a layer's input
            mixes examples or has its batch on an axis its rule does not handle, or the
            losses' batch axis could not be traced.
    """
    layers = hooked_layers(model) if layers is None else layers
    batch = batch_size(inputs, targets)
    loss_target = _loss_target(loss_fn)
    key = _signature(model, layers, loss_fn, loss_target, inputs, targets)
    verified = _VERIFIED.get(model, {}).get(key) if key is not None else None
    if verified is not None and clone_outputs <= verified.clone and verified.loss_ref() is loss_target:
        verified.uses += 1
        if verified.uses % RETRACE_EVERY:
            rec = _replay(model, loss_fn, inputs, targets, layers, verified, batch)
            if rec is not None:
                return rec
    rec = _record_traced(model, loss_fn, inputs, targets, layers, batch, clone_outputs=clone_outputs)
    if key is not None and rec.verified is not None:
        kept = _VERIFIED.setdefault(model, {})
        kept.pop(key, None)
        kept[key] = rec.verified
        while len(kept) > MAX_SIGNATURES:  # e.g. a new loss lambda every step: keep the newest
            kept.pop(next(iter(kept)))
    return rec.recording


@dataclass
class _Traced:
    recording: Recording
    verified: _Verified | None  # None: some layer call cannot be replayed without the trace


def _record_traced(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor,
                   layers: dict[str, nn.Module], batch: int, *, clone_outputs: bool) -> _Traced:
    """:func:`record` under the batch trace."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    trace = BatchTrace(batch, trainable)
    trace.tag_inputs(inputs)
    trace.tag_inputs(targets)
    captures = {name: Capture(m) for name, m in layers.items()}
    out_tags: dict[str, list[Tag]] = {name: [] for name in layers}
    extra_tags: dict[str, list[tuple[Tag, ...]]] = {name: [] for name in layers}
    problems: dict[str, str] = {}
    versions: list[tuple[Tensor, int]] = []  # the layer outputs held as tensors
    inputs_seen: list[tuple[Tensor, int]] = []
    # per layer, per call: (input tag, output tag, shapes) of calls a replay can repeat
    simple: dict[str, list[tuple[Tag, Tag, tuple[int, ...], tuple[int, ...]]]] = {name: [] for name in layers}
    replayable = [True]

    def pre_hook(module, args):
        trace.depth += 1

    def keep(name: str, a_first: Tensor, args: tuple, kwargs: dict, output: Tensor, tag: Tag, replaced):
        """Capture one call of a single-output layer; returns what the forward hook hands
        on (a copy of the output with ``clone_outputs``, else ``replaced`` or ``None``)."""
        copy = _capture_call(captures[name], out_tags[name], versions, inputs_seen, a_first, args, kwargs, output, tag,
                             clone_outputs)
        if copy is None:
            return replaced
        trace.set(copy, tag)
        return copy

    def make_hook(name: str):
        rule = rule_for(layers[name])

        def hook(module, args, kwargs, output):
            trace.depth -= 1
            a = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            if rule.multi_output:
                replayable[0] = False
                return multi_hook(name, module, a, args, kwargs, output)
            if not isinstance(a, Tensor) or not isinstance(output, Tensor):
                problems.setdefault(name, "its input or output is not a single tensor")
                return None
            ta, to = trace.tag(a), trace.tag(output)
            replaced = None
            # a replay can repeat a call whose batch axis is the input's, or whose input is
            # shared by all examples (ta = to = None below)
            if len(args) == 1 and not kwargs and ((ta is not None and ta == to and UNKNOWN != ta)
                                                  or (ta is None and to is None)):
                simple[name].append((ta, to, tuple(a.shape), tuple(output.shape)))
            else:
                replayable[0] = False
            if getattr(rule, "flat_input", False) and a.ndim == 1 and to == (0, 1):
                replayable[0] = False
                # EmbeddingBag(flat, offsets): the trace checked that bag j holds example j's rows
                return keep(name, a, _detach(tuple(args)), _detach(dict(kwargs)), output, to, None)
            if ta is None and to is None:
                # An input shared by all examples (e.g. position_ids [1, T]): the output is
                # broadcast against the batch downstream, and the trace checks that use.
                if output.ndim == 0 or output.shape[0] not in (1, batch) or a.ndim == 0 \
                        or a.shape[0] not in (1, batch):
                    problems.setdefault(name, f"its input {tuple(a.shape)} has no batch axis")
                    return None
                if output.shape[0] != batch:
                    replaced = output.expand(batch, *output.shape[1:])
                    output = replaced
                trace.set(output, (0, 1))
                to = (0, 1)
                a_first = a.expand(batch, *a.shape[1:]) if a.shape[0] != batch else a
            elif ta is None or to is None or UNKNOWN in (ta, to):
                problems.setdefault(name, "its input or output mixes the examples of the batch (or "
                                          "comes from an operation the batch trace cannot follow)")
                return None
            elif to != ta or not rule.batch_axis_ok(module, a.ndim, ta[0]) or \
                    (ta[1] != 1 and not rule.batch_axis_free):
                problems.setdefault(name, f"its input {tuple(a.shape)} has the batch on axis {ta[0]}, "
                                          "which its layer rule does not handle")
                return None
            else:
                a_first = to_batch_first(a, ta, batch)
            return keep(name, a_first, tuple(_batch_first(trace, v, batch) for v in args),
                        {k: _batch_first(trace, v, batch) for k, v in kwargs.items()}, output, to, replaced)

        return hook

    def multi_hook(name, module, a, args, kwargs, output):
        rule = rule_for(module)
        holder = pending.pop(name, None)
        if a is None and args and isinstance(args[0], PackedSequence):
            a = args[0]
        if isinstance(a, PackedSequence):
            ta = packed_tag(a)
            a = a.data
        else:
            ta = trace.tag(a) if isinstance(a, Tensor) else None
        outs = rule.output_tensors(output)
        tags = rule.output_tags(module, ta, outs) if isinstance(ta, (tuple, PackedLayout)) and ta != UNKNOWN \
            else ta if isinstance(ta, str) else "its input is not a tensor with a traced batch axis"
        if not isinstance(tags, str):
            tags = rule.check_call(module, args, kwargs, trace.tag, batch) or tags
        if isinstance(tags, str):
            problems.setdefault(name, tags)
            for o in outs:
                trace.set(o, UNKNOWN)
            return None
        for o, tag in zip(outs, tags):
            if isinstance(tag, PackedLayout):
                perm = tag.sorted_indices.cpu() if tag.sorted_indices is not None else torch.arange(batch)
                trace.set_perm(o, "packed", 0, perm)
            else:
                trace.set(o, tag)
        cap = captures[name]
        cap.inputs.append(to_batch_first(a, ta, batch).detach())
        cap.args.append(_detach(tuple(args)))  # as passed: the rule knows their layouts
        cap.kwargs.append(_detach(dict(kwargs)))
        cap.outputs.append(outs[0])
        cap.extra_outputs.append(tuple(outs[1:]))
        cap.replays.append(holder)
        out_tags[name].append(tags[0])
        extra_tags[name].append(tuple(tags[1:]))
        for o in outs:
            versions.append((o, o._version))
        return None

    def packed_tag(p: PackedSequence) -> PackedLayout | str:
        order = trace.perm(p.data)
        if order is None or order[0] != "packed":
            return ("its PackedSequence was not made by pack_padded_sequence from tensors traced to the "
                    "inputs (pass the lengths [B] among the model's inputs)")
        s = p.sorted_indices
        if not torch.equal(order[2], s.cpu() if s is not None else torch.arange(batch)):
            return ("its PackedSequence's columns are not in the order of its sorted_indices (pack with "
                    "enforce_sorted=False instead of sorting the batch by hand)")
        return PackedLayout(p.batch_sizes, p.sorted_indices, p.unsorted_indices)

    pending: dict[str, Any] = {}
    patched: list[tuple[nn.Module, Any]] = []

    def own_forward(name: str, m: nn.Module, rule):
        def forward(*args, **kwargs):
            got = rule.record_forward(m, args, kwargs)
            if got is None:
                return type(m).forward(m, *args, **kwargs)
            pending[name] = got[1]
            return got[0]

        return forward

    handles = []
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(make_hook(name), with_kwargs=True))
            rule = rule_for(m)
            if hasattr(rule, "record_forward") and "forward" not in m.__dict__:
                replayable[0] = False
                # the rule runs the layer itself, keeping what it needs (no second pass)
                patched.append((m, None))
                m.forward = own_forward(name, m, rule)
        with torch.enable_grad(), trace:
            outputs = call_model(model, inputs)
            losses = loss_fn(outputs, targets)
            loss_tag = trace.tag(losses) if isinstance(losses, Tensor) else None
    finally:
        for h in handles:
            h.remove()
        for m, _ in patched:
            del m.forward
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per example (shape [B]=[{batch}]); got {got}. "
            "Use reduction='none'."
        )
    if trace.violation is not None:
        raise NotHookable(
            f"a trainable parameter is used outside its layer's forward ({trace.violation})"
        )
    lost = f" (the batch axis was first lost at {trace.lost_at})" if trace.lost_at else ""
    if problems:
        first = sorted(problems.items())
        more = f" (and {len(first) - 3} more layers)" if len(first) > 3 else ""
        raise NotHookable("; ".join(f"layer '{n}': {why}" for n, why in first[:3]) + more + lost)
    if loss_tag != (0, 1) and batch > 1:
        raise NotHookable(
            "the batch axis of the losses could not be traced back to the inputs (an operation "
            f"mixes the examples, or is one the batch trace cannot follow){lost}"
        )
    multi = any(rule_for(m).multi_output for m in layers.values())
    if _changed(versions) and (clone_outputs or multi):
        raise NotHookable("a multi-output layer's output is modified in place")
    if not clone_outputs and _changed(versions):
        # A layer output held as a tensor was changed in place; its gradient must be
        # taken before that.
        return _record_traced(model, loss_fn, inputs, targets, layers, batch, clone_outputs=True)
    if _changed(inputs_seen):
        raise NotHookable("a layer's input is modified in place after the layer used it (its "
                          "weight gradient needs that input as it was); change it out of place "
                          "(h = h * 2, not h.mul_(2)) or modify a copy")
    verified = _Verified(simple, clone_outputs, weakref.ref(_loss_target(loss_fn))) if replayable[0] else None
    return _Traced(_finish(captures, out_tags, extra_tags, losses, outputs, batch), verified)


def _capture_call(cap: Capture, tags: list[Tag], versions: list[tuple[Tensor, int]],
                  inputs_seen: list[tuple[Tensor, int]], a_first: Tensor, args: tuple, kwargs: dict,
                  output: Tensor, tag: Tag, clone: bool) -> Tensor | None:
    """Capture one call of a single-output layer (its batch-first input, arguments, output
    edge and output tag); returns the copy of the output to hand on with ``clone``, else
    ``None``. The input's version is noted (a capture whose input the network later changes
    in place is stale), and so is a held output's (see :meth:`OutputRef.of`)."""
    a = a_first.detach()
    cap.inputs.append(a)
    cap.args.append(args)
    cap.kwargs.append(kwargs)
    ref = OutputRef.of(output)
    cap.outputs.append(output if ref is None else ref)
    tags.append(tag)
    inputs_seen.append((a, a._version))
    if ref is None:
        versions.append((output, output._version))
    return output.clone() if clone and output.requires_grad else None


def _changed(seen: list[tuple[Tensor, int]]) -> bool:
    """Some tensor was changed in place since its version was noted (a captured input: the
    capture is stale; a held output: its gradient must be taken before the change)."""
    return any(t._version != v for t, v in seen)


def _finish(captures: dict[str, Capture], out_tags: dict[str, list[Tag]],
            extra_tags: dict[str, list[tuple[Tag, ...]]], losses: Tensor, outputs: Any,
            batch: int) -> Recording:
    """The backward pass of a recording: each recorded output's gradient, batch first."""
    flat = [
        (cap, out, tag)
        for name, cap in captures.items()
        for out, tag in zip(cap.outputs, out_tags[name])
        if out.requires_grad
    ]
    extra = [
        (cap, outs, tags)
        for name, cap in captures.items()
        for main, outs, tags in zip(cap.outputs, cap.extra_outputs, extra_tags[name])
        if main.requires_grad
    ]
    wanted = [o for _, o, _ in flat] + [o for _, outs, _ in extra for o in outs if o.requires_grad]
    # a rule's recording forward (record_forward) may ask for the gradients of tensors inside
    # its layer: its holder's "grad_of"; they arrive in its "grads" (None: no gradient)
    holders = [h for cap in captures.values() for h in cap.replays if isinstance(h, dict) and h.get("grad_of")]
    inner = [t for h in holders for t in h["grad_of"]]
    if wanted or inner:
        grads = torch.autograd.grad(losses.sum(), [_edge(o) for o in wanted] + inner, allow_unused=True)
        rest = list(grads[len(wanted):])
        for h in holders:
            n = len(h.pop("grad_of"))
            h["grads"], rest = rest[:n], rest[n:]
        by_id = {id(o): g for o, g in zip(wanted, grads)}
        for cap, out, tag in flat:
            g = by_id[id(out)]
            g = _zeros(out) if g is None else g.detach().reshape(out.shape)
            cap.grad_outputs.append(to_batch_first(g, tag, batch))
        for cap, outs, tags in extra:
            gs = [by_id.get(id(o)) for o in outs]
            cap.extra_grads.append(tuple(
                to_batch_first(torch.zeros_like(o) if g is None else g.detach(), tag, batch)
                for o, g, tag in zip(outs, gs, tags)
            ))
    for cap in captures.values():
        # Calls whose output needed no gradient contribute nothing.
        keep = [o.requires_grad for o in cap.outputs]
        cap.inputs = [a for a, k in zip(cap.inputs, keep) if k]
        cap.args = [a for a, k in zip(cap.args, keep) if k]
        cap.kwargs = [a for a, k in zip(cap.kwargs, keep) if k]
        cap.replays = [a for a, k in zip(cap.replays, keep) if k] if cap.replays else []
        cap.outputs = []
        cap.extra_outputs = []
    return Recording(losses.detach(), _detach(outputs), captures)


def _edge(o: "Tensor | OutputRef") -> "Tensor | GradientEdge":
    return o.edge if isinstance(o, OutputRef) else o


def _zeros(o: "Tensor | OutputRef") -> Tensor:
    return o.zeros() if isinstance(o, OutputRef) else torch.zeros_like(o)


def _replay(model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor,
            layers: dict[str, nn.Module], verified: _Verified, batch: int) -> Recording | None:
    """:func:`record` without the batch trace, for a signature whose traced recording
    verified every layer call: the same calls, with the same shapes, get the same batch
    tags. ``None`` when this pass differs (other calls or shapes, a loss of the wrong
    shape, an output modified in place without copies): the caller traces it."""
    captures = {name: Capture(m) for name, m in layers.items()}
    out_tags: dict[str, list[Tag]] = {name: [] for name in layers}
    versions: list[tuple[Tensor, int]] = []
    inputs_seen: list[tuple[Tensor, int]] = []

    def make_hook(name: str):
        expected = verified.calls[name]

        def hook(module, args, kwargs, output):
            i = len(out_tags[name])
            if i >= len(expected) or len(args) != 1 or kwargs or not isinstance(output, Tensor):
                raise _Mismatch
            a = args[0]
            ta, to, a_shape, o_shape = expected[i]
            if not isinstance(a, Tensor) or a.shape != a_shape or output.shape != o_shape:
                raise _Mismatch
            if ta is None:  # an input shared by all examples (position ids): as the trace did
                replaced = output.expand(batch, *output.shape[1:]) if output.shape[0] != batch else None
                a_first = (a.expand(batch, *a.shape[1:]) if a.shape[0] != batch else a).detach()
                copy = _capture_call(captures[name], out_tags[name], versions, inputs_seen, a_first,
                                     (a.detach(),), {}, output if replaced is None else replaced, (0, 1),
                                     verified.clone)
                return replaced if copy is None else copy
            a_first = to_batch_first(a, ta, batch).detach()
            return _capture_call(captures[name], out_tags[name], versions, inputs_seen, a_first, (a_first,), {}, output, to,
                                 verified.clone)

        return hook

    handles = [m.register_forward_hook(make_hook(name), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            outputs = call_model(model, inputs)
            losses = loss_fn(outputs, targets)
    except _Mismatch:
        return None
    finally:
        for h in handles:
            h.remove()
    if any(len(out_tags[name]) != len(calls) for name, calls in verified.calls.items()):
        return None
    if not isinstance(losses, Tensor) or losses.shape != (batch,):
        return None
    if _changed(versions) or _changed(inputs_seen):
        return None
    return _finish(captures, out_tags, {name: [] for name in layers}, losses, outputs, batch)


def _batch_first(trace: BatchTrace, v: Any, batch: int) -> Any:
    if not isinstance(v, Tensor):
        return v
    tag = trace.tag(v)
    if tag is None or tag == UNKNOWN:
        return v.detach()
    return to_batch_first(v.detach(), tag, batch)
