"""Per-example gradients, norms and weighted sums from layer hooks, one rule per layer type.

One ordinary forward pass records, for every layer with a *layer rule*, its inputs and
(after one backward pass over ``sum_i loss_i``) the gradient ``d`` of the summed loss
with respect to its output. Because examples do not interact, row ``i`` of ``d`` is the
gradient of ``loss_i`` alone, and each layer's per-example parameter gradients follow in
closed form (Goodfellow 2015; Opacus; BackPACK). The backward pass asks autograd only
for the gradients with respect to layer outputs, so the (unneeded) batch gradients of
the weights are never computed. This is ``method="hooks"`` of :mod:`gradsift.engine`.

Rules, one file per layer family:

=====================  ===================================================================
file                   layers
=====================  ===================================================================
``linear.py``          Linear (on ``[B, ..., in]``), GPT-2's transposed ``Conv1D``
``conv.py``            Conv1d, Conv2d, Conv3d (stride, padding incl. ``'same'``, dilation,
                       groups, every padding mode)
``embedding.py``       Embedding (``padding_idx``, ``scale_grad_by_freq``, ``max_norm``),
                       EmbeddingBag (``[B, L]`` bags or flat ``(input, offsets)``; every mode)
``norms.py``           LayerNorm, RMSNorm, GroupNorm, InstanceNorm (affine)
``rnn.py``             RNN, GRU, LSTM (layers, directions, ``batch_first``, packed
                       sequences; by the cell decomposition)
``attention.py``       MultiheadAttention as a whole (in/out projections, ``bias_k``/``bias_v``,
                       ``kdim``/``vdim``, ``add_zero_attn``, padding and attention masks)
=====================  ===================================================================

A model is *hookable* when every trainable parameter belongs directly to a layer with a
rule (exact type, not a subclass, which may change ``forward``), no trainable parameter
is used outside its layer's ``forward``, and the batch axis of every recorded tensor is
known. That axis is traced from the inputs through every torch operation
(:mod:`gradsift.layers.trace`), never guessed from shapes: a sequence-first ``[T, B, d]``
activation is handled as such even when ``T == B``, and an operation that mixes examples
or that the trace cannot follow makes the engine fall back to :mod:`torch.func` for the
whole model. :func:`explain` says which path a model takes and why.

The trace costs about as much as the forward pass's own Python (0.6 ms of a 1.5 ms MLP
forward), so it runs once per *signature*: the layers, the trainable parameters, every
module's train/eval mode, the loss function and the shapes, dtypes and devices of the
inputs. A recording with a signature already traced replays the verified calls without
the trace: the same layers must be called the same number of times with the same shapes
(else that pass is traced). Every :data:`RETRACE_EVERY`-th recording traces again, at most
8 signatures are kept per model (the newest), and
:func:`forget_traces` drops a model's verdicts (a model whose forward branches on its
data in ways that keep every layer's calls and shapes but change how examples mix).

Your own layer
--------------
Register a :class:`LayerRule` for its type; only :meth:`LayerRule.grads` is required
(norms, weighted sums and reductions default to ones derived from it)::

    import torch
    from torch import nn
    import gradsift as gs
    from gradsift.layers import LayerRule, register_layer_rule

    class Scale(nn.Module):                       # y = x * w, w of shape [d]
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):                     # [B, ..., d] -> [B, ..., d]
            return x * self.weight

    @register_layer_rule(Scale)
    class ScaleRule(LayerRule):
        def grads(self, cap):                     # cap.inputs[k], cap.grad_outputs[k]: [B, ..., d]
            g = sum((a * d).reshape(len(a), -1, a.shape[-1]).sum(1)
                    for a, d in zip(cap.inputs, cap.grad_outputs))
            return {"weight": g}                  # [B, d]

    model = nn.Sequential(nn.Linear(4, 3), Scale(3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = nn.CrossEntropyLoss(reduction="none")
    grads = gs.per_example_gradients(model, loss, x, y, method="hooks")
"""

from __future__ import annotations

from . import attention, conv, embedding, linear, norms, rnn  # noqa: F401  (register the built-in rules)
from .base import (RULES, WRITE_COST, Capture, Grads, LayerRule, outer_norms_sq, own_trainable, register_layer_rule,
                   rule_for, sum_of_squares)
from .linear import BLOCK_ELEMENTS, MatmulRule
from .model import (
    Plan,
    check_hookable,
    explain,
    hook_norms_sq,
    hook_per_example,
    iter_layer_results,
    layer_gram,
    layer_grads,
    layer_norms_sq,
    layer_reduced,
    layer_weighted_sum,
    parameter_names,
    recording_norms_sq,
    unsupported_layers,
)
from .record import RETRACE_EVERY, NotHookable, Recording, forget_traces, hooked_layers, record
from .trace import BatchTrace

__all__ = [
    "forget_traces", "RETRACE_EVERY",
    "BLOCK_ELEMENTS", "BatchTrace", "Capture", "Grads", "LayerRule", "MatmulRule", "NotHookable", "RULES",
    "Plan", "Recording", "check_hookable", "explain", "hook_norms_sq", "hook_per_example", "hooked_layers",
    "iter_layer_results", "layer_gram", "layer_grads", "layer_norms_sq", "layer_reduced",
    "layer_weighted_sum", "outer_norms_sq", "own_trainable", "parameter_names", "record", "recording_norms_sq",
    "register_layer_rule", "rule_for", "sum_of_squares", "unsupported_layers", "WRITE_COST",
]
