"""Which axis of each tensor holds the batch, known by tracing, never guessed from shapes.

While the hooks path records a forward pass, :class:`BatchTrace` (a
:class:`~torch.overrides.TorchFunctionMode`) follows every torch operation. The model's
inputs and the targets carry the batch on axis 0; each operation's outputs get a *tag*
``(axis, inner)`` saying that element ``e`` of the output belongs to example
``(index along axis) // inner`` (``inner > 1`` when the batch was flattened with
following axes, e.g. ``[B, T, V] -> [B*T, V]``). A tensor without a tag does not depend
on the inputs (parameters, buffers, constants, ``position_ids`` of shape ``[1, T]``).

Tags follow the operation's meaning:

* elementwise operations (with broadcasting): the batch axis is aligned from the right;
* ``view``/``reshape``/``flatten``: row-major order is kept, so the batch digit is found
  in the new shape (a ``[T, B, d]`` tensor is never mistaken for ``[B, T, d]``);
* everything else: the operation is run once on ``meta`` tensors whose batch has a
  unique size ``U``; the output axis of size ``U * inner`` is the batch. Operations
  whose ``dim`` argument is the batch axis (``sum(0)``, ``flip(0)``, ``cat(.., 0)``,
  ``softmax(x, 0)``) or that index the batch axis with tensors lose the tag.

An operation whose inputs disagree on the batch axis, or that mixes examples, gives
:data:`UNKNOWN`; a layer that receives an unknown tensor is not recorded, and the
engine falls back to :mod:`torch.func`. Probe results are cached by operation and
shapes, so a repeated block costs one lookup per operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: Tag of a tensor that depends on the inputs in a way the trace cannot follow.
UNKNOWN = (-1, -1)
Tag = tuple[int, int]

#: The probe's batch size: a prime no real axis is a multiple of.
PROBE = 104729

_ATTR = "_gradsift_batch_tag"
_PERM = "_gradsift_batch_perm"

#: Sorting along the last axis by default: a batch-only ``[B]`` tensor is sorted across examples.
_DEFAULT_LAST_DIM = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "cummax",
                     "cummin", "msort", "log_softmax", "softmax", "logsumexp"}

# ------------------------------------------------------------------ operation families

_POINTWISE = set("""
abs absolute acos acosh add addcdiv addcmul angle asin asinh atan atan2 atanh bitwise_and
bitwise_not bitwise_or bitwise_xor bool byte ceil celu char clamp clamp_max clamp_min clip
clone contiguous copysign cos cosh deg2rad detach div divide double dropout alpha_dropout
feature_alpha_dropout dropout1d dropout2d dropout3d elu eq erf erfc erfinv exp exp2 expm1
float float_power floor floor_divide fmax fmin fmod frac ge gelu glu_ greater greater_equal
gt half hardshrink hardsigmoid hardswish hardtanh heaviside hypot i0 int isfinite isinf
isnan isneginf isposinf le leaky_relu lerp less less_equal lgamma log log10 log1p log2
log_sigmoid logaddexp logical_and logical_not logical_or logical_xor logit long lt
masked_fill maximum minimum mish mul multiply nan_to_num ne neg negative not_equal
positive pow prelu rad2deg reciprocal relu relu6 remainder requires_grad_ round rrelu
rsqrt rsub selu sgn short sigmoid sign signbit silu sin sinc sinh softplus softshrink
softsign sqrt square sub subtract tan tanh tanhshrink threshold true_divide trunc where
xlogy bfloat16 cfloat cdouble real imag conj quick_gelu
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
__rtruediv__ __itruediv__ __div__ __rdiv__ __idiv__ __floordiv__ __rfloordiv__ __ifloordiv__
__mod__ __rmod__ __imod__ __pow__ __rpow__ __ipow__ __neg__ __pos__ __abs__ __invert__
__and__ __rand__ __iand__ __or__ __ror__ __ior__ __xor__ __rxor__ __ixor__ __eq__ __ne__
__lt__ __le__ __gt__ __ge__ __lshift__ __rshift__
copy_ fill_ zero_ masked_fill_ clamp_ uniform_ normal_ bernoulli_ bernoulli
""".split())

#: Result follows ``self`` only (the other arguments say dtype/device).
_LIKE_SELF = {"to", "type", "type_as", "cpu", "cuda", "float", "double", "half", "long", "int",
              "bool", "contiguous", "detach", "clone", "requires_grad_", "pin_memory",
              "retain_grad", "view_as_real", "coalesce"}

#: Results that do not depend on the values of their tensor arguments.
_FRESH = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like",
          "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
          "size", "dim", "numel", "stride", "storage_offset", "data_ptr", "element_size",
          "is_contiguous", "is_floating_point", "is_complex", "nelement", "ndimension",
          "get_device", "__len__", "__bool__", "__float__", "__int__", "__index__", "item",
          "tolist", "numpy", "register_hook", "__format__", "__repr__", "__hash__",
          "__reduce_ex__", "equal", "allclose"}

_RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "ravel",
            "squeeze", "unsqueeze"}
_EXPAND = {"expand", "expand_as", "broadcast_to"}

#: Integer arguments of these are never axes (sizes, paddings, indices, groups ...).
_NO_AXIS_ARGS = {
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm",
    "embedding", "embedding_bag", "scaled_dot_product_attention", "matmul", "__matmul__",
    "__rmatmul__", "bmm", "mm", "mv", "baddbmm", "addmm", "addbmm", "addmv", "einsum",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate",
    "upsample", "pixel_shuffle", "pixel_unshuffle", "unfold", "fold", "cross_entropy",
    "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "gaussian_nll_loss",
    "soft_margin_loss", "multilabel_soft_margin_loss", "hinge_embedding_loss", "margin_ranking_loss",
    "tril", "triu", "tril_", "triu_", "diag_embed", "one_hot", "__getitem__",
}

#: These move or add axes: an axis argument equal to the batch axis is harmless.
_AXIS_MOVERS = {"transpose", "transpose_", "permute", "movedim", "moveaxis", "swapaxes",
                "swapdims", "t", "t_", "unsqueeze", "unsqueeze_", "__get__", "T", "mT", "H", "mH",
                "contiguous", "stack", "hstack", "vstack"}

#: These gather or scatter along an axis by index values: unknown if that axis is the batch.
_INDEXING = {"gather", "index_select", "take", "take_along_dim", "scatter", "scatter_",
             "scatter_add", "scatter_add_", "scatter_reduce", "index_add", "index_add_",
             "index_copy", "index_copy_", "index_fill", "index_fill_", "index_put", "index_put_",
             "masked_select", "masked_scatter", "masked_scatter_", "nonzero", "argwhere",
             "unique", "unique_consecutive", "bincount", "histc", "put_", "put", "repeat_interleave",
             "__setitem__"}


#: Operations that may permute the batch (see :meth:`BatchTrace._permutation`).
_PERMUTING = {"sort"}
_PERMUTING_ANY = {"index_select", "__getitem__", "_pack_padded_sequence", "_pad_packed_sequence",
                  "masked_select", "embedding_bag"}


def get_tag(t: Tensor, session: object) -> Tag | None:
    """``(axis, inner)`` of ``t`` in this trace, ``UNKNOWN``, or ``None`` (no batch)."""
    entry = getattr(t, _ATTR, None)
    if entry is None or entry[0] is not session:
        return None
    return entry[1]


def set_tag(t: Tensor, session: object, tag: Tag | None) -> None:
    """Attach ``tag`` to ``t`` for this trace (``None`` clears it)."""
    try:
        setattr(t, _ATTR, None if tag is None else (session, tag))
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types
        pass


def get_perm(t: Tensor, session: object) -> tuple[str, int, Tensor] | None:
    """A permuted or packed batch: ``(kind, axis, perm)``, or ``None``.

    ``kind == "padded"``: position ``j`` along ``axis`` holds example ``perm[j]``.
    ``kind == "packed"``: ``t`` is a ``PackedSequence``'s data whose column ``j`` (in the
    ``batch_sizes`` layout) is example ``perm[j]``. Such tensors are tagged :data:`UNKNOWN`,
    so that only the operations below (and the recurrent layers) use them.
    """
    entry = getattr(t, _PERM, None)
    if entry is None or entry[0] is not session:
        return None
    return entry[1]


@dataclass
class PackedLayout:
    """The batch layout of a ``PackedSequence``'s data ``[N, ...]`` (a tag of its own).

    Column ``j`` of the ``batch_sizes`` layout is example ``perm[j]``; the engine accepts
    a packed sequence only when ``perm`` is its ``sorted_indices`` (identity when
    ``None``), as :func:`torch.nn.utils.rnn.pack_padded_sequence` makes it.
    """

    batch_sizes: Tensor
    sorted_indices: Tensor | None
    unsorted_indices: Tensor | None

    def unpack(self, data: Tensor) -> Tensor:
        """``[N, ...]`` packed data -> ``[B, T_max, ...]`` in example order, zeros past each length."""
        with torch._C.DisableTorchFunction():
            t = int(len(self.batch_sizes))
            padded, _ = torch._VF._pad_packed_sequence(data, self.batch_sizes, True, 0.0, t)
            if self.unsorted_indices is not None:
                padded = padded.index_select(0, self.unsorted_indices.to(padded.device))
        return padded

    def lengths(self) -> Tensor:
        """``[B]`` sequence lengths in example order (CPU, int64)."""
        b = int(self.batch_sizes[0]) if len(self.batch_sizes) else 0
        sizes = self.batch_sizes.cpu()
        lens = (sizes.unsqueeze(0) > torch.arange(b).unsqueeze(1)).sum(1)
        return lens if self.unsorted_indices is None else lens[self.unsorted_indices.cpu()]


def to_batch_first(t: Tensor, tag: Tag | PackedLayout, batch: int) -> Tensor:
    """View ``t`` with the batch on axis 0: ``[B, ...]`` (``[B, ..., inner, ...]`` if inner > 1);
    packed data (:class:`PackedLayout`) is padded to ``[B, T_max, ...]``."""
    if isinstance(tag, PackedLayout):
        return tag.unpack(t)
    axis, inner = tag
    if inner == 1:
        return t if axis == 0 else t.movedim(axis, 0)
    shape = tuple(t.shape)
    t = t.reshape(*shape[:axis], batch, inner, *shape[axis + 1 :])
    return t.movedim(axis, 0)


def _leaves(x: Any, out: list) -> list:
    if isinstance(x, Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _leaves(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _leaves(v, out)
    return out


def _name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


def _ints(x: Any, out: list) -> list:
    if isinstance(x, bool):
        return out
    if isinstance(x, int):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _ints(v, out)
    return out


class BatchTrace(TorchFunctionMode):
    """Tags every tensor computed from the inputs with its batch axis (see module docs).

    Also notes any operation on a trainable parameter outside a recorded layer's
    ``forward`` (``depth == 0``): its per-example gradient would be missed.

    Args:
        batch: ``B``.
        params: ``id`` of every trainable parameter.
    """

    _cache: dict[Any, Any] = {}

    def __init__(self, batch: int, params: set[int]):
        super().__init__()
        self.batch = batch
        self.params = params
        self.depth = 0
        self.violation: str | None = None
        self.lost_at: str | None = None  # the first operation that lost the batch axis
        self.session = object()

    # -------------------------------------------------------------- public helpers

    def tag(self, t: Tensor) -> Tag | None:
        return get_tag(t, self.session)

    def set(self, t: Tensor, tag: Tag | None) -> None:
        set_tag(t, self.session, tag)

    def perm(self, t: Tensor) -> tuple[str, int, Tensor] | None:
        """See :func:`get_perm`."""
        return get_perm(t, self.session)

    def set_perm(self, t: Tensor, kind: str, axis: int, perm: Tensor) -> None:
        """Mark ``t`` as a permuted (``"padded"``) or ``"packed"`` batch; an identity
        permutation of a padded tensor is an ordinary tag ``(axis, 1)``."""
        if kind == "padded" and bool((perm == torch.arange(len(perm), device=perm.device)).all()):
            self.set(t, (axis, 1))
            setattr(t, _PERM, None)
            return
        self.set(t, UNKNOWN)
        try:
            setattr(t, _PERM, (self.session, (kind, axis, perm)))
        except (AttributeError, RuntimeError):  # pragma: no cover
            pass

    def _batch_order(self, t: Tensor) -> tuple[str, int, Tensor] | None:
        """``(kind, axis, perm)`` of a traced tensor whose examples are whole rows along one axis."""
        p = self.perm(t)
        if p is not None:
            return p
        tag = self.tag(t)
        if tag is None or tag == UNKNOWN or tag[1] != 1:
            return None
        return ("padded", tag[0], torch.arange(self.batch))

    def _permutation(self, func, name, args, kwargs, result) -> bool:
        """Follow a permutation of the batch (packing sequences, ``index_select`` by a
        permutation, sorting a ``[B]`` tensor); ``True`` if handled."""
        if name == "sort" and isinstance(args[0], Tensor) and args[0].ndim == 1 and \
                self._batch_order(args[0]) is not None and isinstance(result, tuple):
            kind, axis, p = self._batch_order(args[0])
            if kind != "padded":
                return False
            values, indices = result
            self.set_perm(values, "padded", 0, p[indices.cpu()])
            self.set(indices, UNKNOWN)
            return True
        if name in ("__getitem__", "masked_select") and isinstance(args[0], Tensor) and self._ragged(name, args, result):
            return True
        if name == "embedding_bag":
            return self._embedding_bag(args, kwargs, result)
        if name in ("index_select", "__getitem__") and isinstance(args[0], Tensor):
            src = args[0]
            if name == "__getitem__" and not any(isinstance(v, Tensor) for v in (
                    args[1] if isinstance(args[1], tuple) else (args[1],))):
                return False  # basic indexing: the ordinary rules
            order = self._batch_order(src)
            if order is None or order[0] != "padded":
                return False
            axis, p = order[1], order[2]
            if name == "index_select":
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                index = args[2] if len(args) > 2 else kwargs.get("index")
                if not isinstance(dim, int) or dim % src.ndim != axis:
                    return False
            else:
                idx = args[1] if isinstance(args[1], tuple) else (args[1],)
                if len(idx) != axis + 1 or any(not (isinstance(v, slice) and v == slice(None)) for v in idx[:axis]):
                    return False
                index = idx[axis]
            if not isinstance(index, Tensor) or index.ndim != 1 or index.is_floating_point() or \
                    index.dtype == torch.bool or len(index) != self.batch:
                return False
            cpu = index.cpu().long()
            if not bool((cpu.sort().values == torch.arange(self.batch)).all()):
                return False
            self.set_perm(result, "padded", axis, p[cpu])
            return True
        if name == "_pack_padded_sequence":
            src, lengths, batch_first = args[0], args[1], args[2]
            order, lorder = self._batch_order(src), self._batch_order(lengths)
            if order is None or lorder is None or order[0] != "padded" or lorder[0] != "padded" or \
                    order[1] != (0 if batch_first else 1) or lorder[1] != 0 or not torch.equal(order[2], lorder[2]):
                return False
            self.set_perm(result[0], "packed", 0, order[2])
            return True
        if name == "_pad_packed_sequence":
            order = self.perm(args[0])
            if order is None or order[0] != "packed":
                return False
            batch_first = args[2] if len(args) > 2 else kwargs.get("batch_first")
            padded, lengths = result
            self.set_perm(padded, "padded", 0 if batch_first else 1, order[2])
            self.set_perm(lengths, "padded", 0, order[2])
            return True
        return False

    def _ragged(self, name: str, args, result) -> bool:
        """``x[mask]`` / ``masked_select(x, mask)`` with the batch on axis 0 of ``x``: the flat
        result is *ragged*, row ``r`` belonging to example ``mask.nonzero()[r, 0]``."""
        src, mask = args[0], args[1]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or not isinstance(result, Tensor):
            return False
        if self.tag(src) != (0, 1) or self.perm(src) is not None:
            return False
        if name == "__getitem__" and mask.shape != src.shape[: mask.ndim]:
            return False
        if name == "masked_select":
            if mask.shape != src.shape:
                return False
        with torch._C.DisableTorchFunction():
            ids = mask.nonzero()[:, 0].cpu()
        if len(ids) != result.shape[0] or (mask.ndim and mask.shape[0] != self.batch):
            return False
        self.set_perm(result, "ragged", 0, ids)
        if self.lost_at is None:
            self.lost_at = f"{name} by a mask (a ragged batch, followed only into EmbeddingBag with offsets)"
        return True

    def rows_of(self, t: Tensor) -> Tensor | None:
        """The example of each row (axis 0) of a flat tensor: ``[N]`` (CPU), or ``None``."""
        p = self.perm(t)
        if p is not None:
            return p[2] if p[0] == "ragged" or (p[0] == "padded" and p[1] == 0) else None
        tag = self.tag(t)
        if tag is None or tag == UNKNOWN or tag[0] != 0:
            return None
        return torch.arange(t.shape[0]) // tag[1]

    def _embedding_bag(self, args, kwargs, result) -> bool:
        """``F.embedding_bag(flat [N], weight, offsets, ...)``: bag ``j`` is example ``j`` when every
        row in it belongs to example ``j`` (traced), and there are ``B`` bags."""
        import inspect

        import torch.nn.functional as F

        bound = inspect.signature(F.embedding_bag).bind(*args, **kwargs).arguments
        flat, offsets = bound.get("input"), bound.get("offsets")
        if not isinstance(flat, Tensor) or flat.ndim != 1 or not isinstance(offsets, Tensor):
            return False
        rows = self.rows_of(flat)
        psw = bound.get("per_sample_weights")
        out = result[0] if isinstance(result, tuple) else result
        if rows is None:
            return False
        if isinstance(psw, Tensor):
            prow = self.rows_of(psw)
            same = prow is not None and torch.equal(prow, rows)
            if not same and not (self.tag(psw) is None and self.perm(psw) is None and bool((psw == psw[:1]).all())):
                return False
        with torch._C.DisableTorchFunction():
            off = offsets.cpu().long()
            n = flat.shape[0]
            end = int(off[-1]) if bound.get("include_last_offset") else n
            starts = off[:-1] if bound.get("include_last_offset") else off
            if len(starts) != self.batch:
                return False
            bag = torch.searchsorted(starts, torch.arange(end), right=True) - 1
            if not bool((bag == rows[:end]).all()):
                return False
        self.set(out, (0, 1))
        return True

    def tag_inputs(self, x: Any) -> None:
        """Tag every tensor in ``x`` (a tensor, tuple, list or dict) as batch-first."""
        for t in _leaves(x, []):
            if t.ndim == 0 or t.shape[0] != self.batch:
                raise ValueError(
                    f"every input tensor must have the batch (size {self.batch}) on dim 0; got "
                    f"shape {tuple(t.shape)}"
                )
            self.set(t, (0, 1))

    # -------------------------------------------------------------- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = _leaves(args, [])
        if kwargs:
            _leaves(kwargs, tensors)
        if not tensors:
            return result
        if self.depth == 0 and self.violation is None and self.params:
            name = _name(func)
            if name not in _FRESH and name not in ("shape", "dtype", "device", "requires_grad", "ndim"):
                for t in tensors:
                    if id(t) in self.params:
                        self.violation = name
                        break
        tags = [self.tag(t) for t in tensors]
        name = _name(func)
        if name in _PERMUTING and UNKNOWN not in tags[1:] or name in _PERMUTING_ANY:
            try:
                if self._permutation(func, name, args, kwargs, result):
                    return result
            except Exception:  # noqa: BLE001 - a failed analysis only loses tags
                pass
        if all(tag is None for tag in tags):
            if _name(func) == "__setitem__":
                self._setitem(args, tensors, tags)
            return result
        try:
            self._propagate(func, args, kwargs, tensors, tags, result)
        except Exception:  # noqa: BLE001 - a failed analysis only loses tags
            for out in _leaves(result, []):
                self.set(out, UNKNOWN)
        if self.lost_at is None and UNKNOWN not in tags:
            outs = _leaves(result, [])
            if any(self.tag(o) == UNKNOWN for o in outs) or (
                _name(func) == "__setitem__" and isinstance(args[0], Tensor) and self.tag(args[0]) == UNKNOWN
            ):
                shapes = ", ".join(f"{tuple(t.shape)}@{tag[0] if tag else '-'}" for t, tag in zip(tensors, tags))
                self.lost_at = f"{_name(func)}({shapes})"
        return result

    # -------------------------------------------------------------- rules

    def _propagate(self, func, args, kwargs, tensors, tags, result) -> None:
        name = _name(func)
        outs = _leaves(result, [])
        if name in _FRESH:
            return
        if name == "__setitem__":
            self._setitem(args, tensors, tags)
            return
        if not outs:
            return
        if UNKNOWN in tags:
            for o in outs:
                self.set(o, UNKNOWN)
            return
        base = name.rstrip("_") if name.endswith("_") and not name.endswith("__") else name
        if name in _LIKE_SELF and isinstance(args[0], Tensor) and len(outs) == 1:
            self.set(outs[0], self.tag(args[0]))
        elif base in _POINTWISE or name in _POINTWISE:
            self._pointwise(tensors, tags, outs)
        elif name in _RESHAPE and isinstance(args[0], Tensor) and len(outs) == 1:
            self._reshape(args[0], outs[0])
        elif name in _EXPAND and isinstance(args[0], Tensor) and len(outs) == 1:
            self._expand(args[0], outs[0])
        elif name == "repeat" and isinstance(args[0], Tensor):
            self._repeat(args, outs[0])
        elif name == "__getitem__" and self._arange_index(args, outs):
            pass
        else:
            self._probe(func, name, args, kwargs, outs)

    def _setitem(self, args, tensors, tags) -> None:
        target = args[0]
        if not isinstance(target, Tensor):
            return
        t0 = self.tag(target)
        others = [tag for t, tag in zip(tensors, tags) if t is not target]
        if t0 is None and any(tag is not None for tag in others):
            self.set(target, UNKNOWN)
        elif t0 is not None and t0 != UNKNOWN:
            index = args[1] if len(args) > 1 else None
            if not self._index_keeps_batch(target, t0, index) or UNKNOWN in others:
                self.set(target, UNKNOWN)

    def _index_keeps_batch(self, t: Tensor, tag: Tag, index: Any) -> bool:
        """Whether ``t[index]`` keeps every example's rows on the same axis."""
        idx = index if isinstance(index, tuple) else (index,)
        pos = 0
        for k, item in enumerate(idx):
            if item is Ellipsis:
                rest = sum(1 for v in idx[k + 1 :] if v is not None)
                pos = t.ndim - rest
                continue
            if item is None:
                continue
            if pos == tag[0]:
                return isinstance(item, slice) and item == slice(None)
            pos += 1 if not (isinstance(item, Tensor) and item.dtype == torch.bool) else item.ndim
            if pos > tag[0]:
                return True
        return True

    def _pointwise(self, tensors, tags, outs) -> None:
        out_ndim = outs[0].ndim
        found: Tag | None = None
        for t, tag in zip(tensors, tags):
            if tag is None:
                continue
            axis = out_ndim - t.ndim + tag[0]
            mapped = (axis, tag[1])
            if axis < 0 or (found is not None and found != mapped):
                found = UNKNOWN
                break
            if outs[0].shape[axis] != t.shape[tag[0]]:
                found = UNKNOWN
                break
            found = mapped
        for o in outs:
            self.set(o, found if o.ndim == out_ndim else UNKNOWN)

    def _reshape(self, src: Tensor, out: Tensor) -> None:
        """Row-major order is kept: the batch digit sits after ``prefix`` elements-blocks and
        before ``unit`` elements per example; find the output axis holding it."""
        axis, inner = self.tag(src)  # type: ignore[misc]
        shape, new = tuple(src.shape), tuple(out.shape)
        prefix = math.prod(shape[:axis])
        unit = inner * math.prod(shape[axis + 1 :])
        for j in range(len(new)):
            if math.prod(new[:j]) == prefix and new[j] % self.batch == 0 and \
                    (new[j] // self.batch) * math.prod(new[j + 1 :]) == unit:
                self.set(out, (j, new[j] // self.batch))
                return
        self.set(out, UNKNOWN)

    def _expand(self, src: Tensor, out: Tensor) -> None:
        axis, inner = self.tag(src)  # type: ignore[misc]
        j = out.ndim - src.ndim + axis
        ok = j >= 0 and out.shape[j] == src.shape[axis]
        self.set(out, (j, inner) if ok else UNKNOWN)

    def _repeat(self, args, out: Tensor) -> None:
        src = args[0]
        axis, inner = self.tag(src)  # type: ignore[misc]
        reps = _ints(list(args[1:]), [])
        j = len(reps) - src.ndim + axis
        ok = 0 <= j < len(reps) and reps[j] == 1
        self.set(out, (j, inner) if ok else UNKNOWN)

    def _arange_index(self, args, outs) -> bool:
        """``x[arange(B) (any broadcast shape), index, ...]``: each example's own row.

        Covers ``logits[torch.arange(B), last_token]`` and HuggingFace's padding masks
        ``mask[batch_arange[:, None, None, None], kv_arange[None, None, None, :]]``.
        """
        src, index = args[0], args[1] if len(args) > 1 else None
        if not isinstance(src, Tensor) or self.tag(src) != (0, 1) or len(outs) != 1:
            return False
        idx = index if isinstance(index, tuple) else (index,)
        first = idx[0]
        if not isinstance(first, Tensor) or self.tag(first) is not None or first.is_floating_point() \
                or first.dtype == torch.bool:
            return False
        axes = [j for j, s in enumerate(first.shape) if s != 1]
        if self.batch == 1:
            axes = axes or [first.ndim - 1] if first.ndim else []
        if len(axes) != 1 or first.shape[axes[0]] != self.batch:
            return False
        j = axes[0]
        if not bool((first.reshape(-1) == torch.arange(self.batch, device=first.device)).all()):
            return False
        tensors = [first]
        for item in idx[1:]:
            if not isinstance(item, Tensor):
                break
            if item.dtype == torch.bool:
                return False
            tensors.append(item)
        if any(isinstance(item, Tensor) for item in idx[len(tensors):]):
            return False
        nd = max(t.ndim for t in tensors)
        axis = nd - first.ndim + j
        for t in tensors[1:]:
            tag = self.tag(t)
            if tag is not None and (tag[1] != 1 or nd - t.ndim + tag[0] != axis):
                return False
        self.set(outs[0], (axis, 1))
        return True

    def _probe(self, func, name, args, kwargs, outs) -> None:
        """Run ``func`` on meta tensors whose batch has size :data:`PROBE`; find it in the outputs."""
        tensors = _leaves((args, kwargs), [])
        tagged = {id(t): self.tag(t) for t in tensors if self.tag(t) is not None}
        if name in _INDEXING:
            raise ValueError(name)
        if name == "__getitem__" and id(args[0]) in tagged and \
                not self._index_keeps_batch(args[0], tagged[id(args[0])], args[1]):
            raise ValueError("indexing the batch axis")
        if name == "pad":  # F.pad(x, pad): pads the last len(pad) // 2 axes
            x, pad = args[0], args[1] if len(args) > 1 else kwargs["pad"]
            if id(x) in tagged and tagged[id(x)][0] >= x.ndim - len(pad) // 2:
                raise ValueError("padding the batch axis")
        if name in _DEFAULT_LAST_DIM and "dim" not in kwargs and not _ints(list(args[1:2]), []):
            first = args[0] if args and isinstance(args[0], Tensor) else None
            tag = tagged.get(id(first)) if first is not None else None
            if tag is not None and tag[0] == (0 if name == "msort" else first.ndim - 1):
                raise ValueError(f"{name} along the batch axis (its default axis)")
        if name != "pad" and name not in _NO_AXIS_ARGS and name not in _AXIS_MOVERS:
            for t in tensors:
                tag = tagged.get(id(t))
                if tag is None:
                    continue
                for v in _ints((args[1:] if args and args[0] is t else args, kwargs.get("dim"), kwargs.get("dims"),
                                kwargs.get("axis")), []):
                    if v == tag[0] or v == tag[0] - t.ndim:
                        raise ValueError(f"{name} along the batch axis")
        key = (func, _signature((args, kwargs), tagged))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._run_probe(func, args, kwargs, tagged)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = cached
        for o, tag in zip(outs, cached):
            self.set(o, tag)
        for o in outs[len(cached):]:
            self.set(o, UNKNOWN)

    def _run_probe(self, func, args, kwargs, tagged) -> list[Tag]:
        for widen_shared in (False, True):
            def meta(x):
                if isinstance(x, Tensor):
                    tag = tagged.get(id(x))
                    shape = list(x.shape)
                    if tag is not None:
                        shape[tag[0]] = PROBE * tag[1]
                    elif widen_shared and ref_ndim is not None and x.ndim == ref_ndim and \
                            x.shape[ref_axis] == self.batch * ref_inner:
                        shape[ref_axis] = PROBE * ref_inner
                    return torch.empty(shape, dtype=x.dtype, device="meta")
                if isinstance(x, (list, tuple)):
                    return type(x)(meta(v) for v in x) if not hasattr(x, "_fields") else type(x)(*(meta(v) for v in x))
                if isinstance(x, dict):
                    return {k: meta(v) for k, v in x.items()}
                return x

            first = next(t for t in _leaves((args, kwargs), []) if id(t) in tagged)
            ref_ndim, (ref_axis, ref_inner) = first.ndim, tagged[id(first)]
            try:
                with torch.no_grad():
                    res = func(*meta(tuple(args)), **meta(dict(kwargs)))
            except Exception:  # noqa: BLE001
                continue
            tags: list[Tag] = []
            for o in _leaves(res, []):
                hits = [j for j, s in enumerate(o.shape) if s and s % PROBE == 0]
                if len(hits) == 1:
                    tags.append((hits[0], o.shape[hits[0]] // PROBE))
                else:
                    tags.append(UNKNOWN)
            return tags
        return []


def _signature(x: Any, tagged: dict) -> Any:
    if isinstance(x, Tensor):
        return ("T", tuple(x.shape), x.dtype, tagged.get(id(x)))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_signature(v, tagged) for v in x))
    if isinstance(x, dict):
        return ("D", tuple((k, _signature(v, tagged)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))))
    if isinstance(x, slice):
        return ("S", x.start, x.stop, x.step)
    if isinstance(x, (int, float, str, bool, type(None), torch.dtype, torch.device)) or x is Ellipsis:
        return x
    return ("O", id(x))
