"""Model inputs as a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).

Every tensor in them has the batch on dim 0; other values (``None``, flags) are passed
as they are. Targets are a tensor with the batch on dim 0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

#: A model's inputs: ``Tensor``, ``tuple`` of arguments or ``dict`` of keyword arguments.
Inputs = Any


def call_model(model: Callable, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict (or Mapping)."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict) or hasattr(inputs, "keys") and not isinstance(inputs, Tensor):
        return model(**inputs)
    return model(inputs)


def input_tensors(inputs: Inputs) -> list[Tensor]:
    """The tensors in ``inputs`` (in argument order)."""
    if isinstance(inputs, Tensor):
        return [inputs]
    values = inputs if isinstance(inputs, tuple) else list(inputs.values()) if hasattr(inputs, "keys") else [inputs]
    return [v for v in values if isinstance(v, Tensor)]


def map_inputs(inputs: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """Apply ``fn`` to every tensor in ``inputs``, keeping the container."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, tuple):
        return tuple(fn(v) if isinstance(v, Tensor) else v for v in inputs)
    if hasattr(inputs, "keys"):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return inputs


def select(inputs: Inputs, index: slice | int) -> Inputs:
    """Examples ``index`` (a slice keeps the batch dim) of every tensor in ``inputs``."""
    return map_inputs(inputs, lambda t: t[index])


def batch_size(inputs: Inputs, targets: Any = None) -> int:
    """``B``, checking that every input tensor (and ``targets``) has it on dim 0.

    Raises:
        ValueError: no tensor, a 0-d tensor, or two tensors disagree on ``B``.
    """
    tensors = input_tensors(inputs)
    if not tensors:
        raise ValueError(
            "inputs must be a tensor, a tuple of arguments or a dict of keyword arguments "
            f"holding at least one tensor; got {type(inputs).__name__}"
        )
    named = [("inputs", t) for t in tensors]
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise ValueError(f"targets must be a tensor with the batch on dim 0, got {type(targets).__name__}")
        named.append(("targets", targets))
    if any(t.ndim == 0 for _, t in named):
        raise ValueError("inputs and targets must have a leading batch dimension")
    sizes = {int(t.shape[0]) for _, t in named}
    if len(sizes) > 1:
        detail = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
        raise ValueError(f"inputs and targets disagree on the batch size (dim 0): {detail}")
    return sizes.pop()


def split_tensors(inputs: Inputs) -> tuple[list[Tensor], Callable[[list[Tensor]], Inputs]]:
    """The tensors of ``inputs`` and a function putting other tensors in their places.

    For ``torch.func.vmap``, which maps over tensors only (``None`` and flags stay put).
    """
    if isinstance(inputs, Tensor):
        return [inputs], lambda ts: ts[0]
    if isinstance(inputs, tuple):
        slots = [i for i, v in enumerate(inputs) if isinstance(v, Tensor)]

        def rebuild_tuple(ts: list[Tensor]) -> tuple:
            out = list(inputs)
            for i, t in zip(slots, ts):
                out[i] = t
            return tuple(out)

        return [inputs[i] for i in slots], rebuild_tuple
    keys = [k for k, v in inputs.items() if isinstance(v, Tensor)]

    def rebuild_dict(ts: list[Tensor]) -> dict:
        out = dict(inputs)
        out.update(zip(keys, ts))
        return out

    return [inputs[k] for k in keys], rebuild_dict


def unsqueeze_example(inputs: Inputs) -> Inputs:
    """A single example (batch dim removed, as inside ``vmap``) back to a batch of one."""
    return map_inputs(inputs, lambda t: t.unsqueeze(0))


def to_device(inputs: Inputs, device: torch.device | str) -> Inputs:
    """Move every tensor in ``inputs`` to ``device``."""
    return map_inputs(inputs, lambda t: t.to(device))


__all__ = ["Inputs", "batch_size", "call_model", "input_tensors", "map_inputs", "select",
           "split_tensors", "to_device", "unsqueeze_example"]
