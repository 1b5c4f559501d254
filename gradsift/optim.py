"""Optimizers by spec: ``"sgd:lr=0.1,momentum=0.9"``, ``"adamw:lr=1e-3"``.

gradsift never steps parameters itself: it writes ``.grad`` and a torch optimizer steps.
Names resolve case-insensitively against ``torch.optim``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import SpecError
from .specs import parse_spec


def _torch_optimizers() -> dict[str, type]:
    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            out[name.lower()] = obj
    return out


def optimizer_class(name: str) -> type:
    """The optimizer class for ``name`` (e.g. ``sgd``, ``adam``, ``adamw``)."""
    table = _torch_optimizers()
    key = name.lower().replace("_", "")
    if key not in table:
        raise SpecError(f"unknown optimizer '{name}'. Known: {', '.join(sorted(table))}")
    return table[key]


def optimizer_from_spec(spec: str, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Build an optimizer over ``params`` from ``"name:k=v,..."``."""
    name, kwargs = parse_spec(spec)
    cls = optimizer_class(name)
    try:
        return cls(list(params), **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"bad options for optimizer '{name}': {e}") from None
