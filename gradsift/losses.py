"""Per-example losses ``(outputs, targets) -> [B]`` for classifiers and language models.

They accept the model's output as it is: a tensor of logits, a tuple whose first item
is the logits, or any object with a ``.logits`` attribute (HuggingFace ``ModelOutput``).
Use them as ``loss_fn`` anywhere in gradsift; options go through ``functools.partial``::

    import functools, gradsift as gs
    grads = gs.per_example_gradients(model, gs.losses.cross_entropy, batch, labels)
    lm_loss = functools.partial(gs.losses.sequence_cross_entropy, shift=True)
    norms = gs.per_example_norms(gpt2, lm_loss, batch, batch["input_ids"])
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's output: ``outputs.logits``, ``outputs[0]`` or ``outputs`` itself."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(outputs).__name__}; pass a loss_fn "
        "that takes this output, or return a tensor / tuple / object with .logits"
    )


def cross_entropy(
    outputs: Any, targets: Tensor, *, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Classification cross-entropy per example.

    Args:
        outputs: logits ``[B, C]`` (or an output holding them, see :func:`logits_of`).
        targets: class indices ``[B]`` (an ``ignore_index`` target gives loss 0).

    Returns:
        ``[B]``.
    """
    return F.cross_entropy(
        logits_of(outputs), targets, reduction="none", label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )


def sequence_cross_entropy(
    outputs: Any, targets: Tensor, *, shift: bool = False, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-sequence mean of token cross-entropies (masked and causal language modelling).

    Args:
        outputs: logits ``[B, T, V]`` (or an output holding them, see :func:`logits_of`).
        targets: token ids ``[B, T]``; positions equal to ``ignore_index`` (padding,
            unmasked tokens) do not count.
        shift: predict token ``t + 1`` from position ``t`` (causal LM with
            ``targets = input_ids``, as HuggingFace's ``labels``).

    Returns:
        ``[B]``: the mean loss over each sequence's counted tokens (0 if none count).
    """
    logits = logits_of(outputs)
    if shift:
        logits, targets = logits[:, :-1], targets[:, 1:]
    b, t, v = logits.shape
    tokens = F.cross_entropy(
        logits.reshape(b * t, v), targets.reshape(b * t), reduction="none", ignore_index=ignore_index
    ).view(b, t)
    counted = (targets != ignore_index).to(tokens.dtype)
    return tokens.sum(1) / counted.sum(1).clamp_min(1.0)
