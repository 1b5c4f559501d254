"""Optimizers by spec: ``"sgd:lr=0.1,momentum=0.9"``, ``"adamw:lr=1e-3"``, ``"lion:lr=1e-4"``.

gradsift never steps parameters itself: it writes ``.grad`` and any torch optimizer steps.
Names resolve case-insensitively against ``torch.optim`` first, then against the
``pytorch-optimizer`` package's registry (``pytorch_optimizer.load_optimizer``: DiffGrad,
AdamP, Lion, AdEMAMix, MADGRAD and over a hundred more), when it is installed
(``pip install pytorch-optimizer``).
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


def _pytorch_optimizer_names() -> list[str]:
    try:
        import pytorch_optimizer
    except ImportError:
        return []
    return sorted(pytorch_optimizer.get_supported_optimizers())


def available_optimizers() -> dict[str, list[str]]:
    """Optimizer names by source: ``{"torch": [...], "pytorch_optimizer": [...]}``."""
    return {"torch": sorted(_torch_optimizers()), "pytorch_optimizer": _pytorch_optimizer_names()}


def optimizer_class(name: str) -> type:
    """The optimizer class for ``name``: ``torch.optim`` first (``sgd``, ``adam``,
    ``adamw``, ...), then ``pytorch_optimizer`` (``lion``, ``ademamix``, ``madgrad``, ...)."""
    table = _torch_optimizers()
    key = name.lower().replace("-", "_")
    if key.replace("_", "") in table:
        return table[key.replace("_", "")]
    try:
        import pytorch_optimizer
    except ImportError:
        pytorch_optimizer = None
    if pytorch_optimizer is not None:
        for candidate in dict.fromkeys((key, key.replace("_", ""))):
            try:
                return pytorch_optimizer.load_optimizer(candidate)
            except (NotImplementedError, ImportError, KeyError):
                continue
    hint = "" if pytorch_optimizer is not None else " (pip install pytorch-optimizer for more)"
    known = ", ".join(sorted(table))
    raise SpecError(
        f"unknown optimizer '{name}'. Known: {known} (torch.optim), and "
        f"{len(_pytorch_optimizer_names())} from pytorch_optimizer (gs.optim.available_optimizers())"
        f"{hint}"
    )


def optimizer_from_spec(spec: str, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Build an optimizer over ``params`` from ``"name:k=v,..."``."""
    name, kwargs = parse_spec(spec)
    cls = optimizer_class(name)
    try:
        return cls(list(params), **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"bad options for optimizer '{name}': {e}") from None


def scheduler_from_spec(spec: str, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Build an epoch-wise learning-rate scheduler from ``torch.optim.lr_scheduler`` by spec,
    e.g. ``"multisteplr:milestones=(50,),gamma=0.1"`` or ``"cosineannealinglr:T_max=60"``
    (names are case-insensitive; ``step``/``multistep``/``cosine`` are accepted too)."""
    name, kwargs = parse_spec(spec)
    sched = torch.optim.lr_scheduler
    table = {
        n.lower(): getattr(sched, n) for n in dir(sched)
        if isinstance(getattr(sched, n), type) and issubclass(getattr(sched, n), sched.LRScheduler)
    }
    table.update({"step": sched.StepLR, "multistep": sched.MultiStepLR, "cosine": sched.CosineAnnealingLR})
    key = name.replace("_", "")
    if key not in table:
        raise SpecError(f"unknown lr schedule '{name}'. Known: {', '.join(sorted(table))}")
    if "milestones" in kwargs and not isinstance(kwargs["milestones"], (list, tuple)):
        kwargs["milestones"] = [kwargs["milestones"]]
    try:
        return table[key](optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"bad options for lr schedule '{name}': {e}") from None
