"""Small reference models (built by spec, e.g. ``mlp:width=256,depth=2``)."""

from __future__ import annotations

import math
import numbers

from torch import nn

from .errors import SpecError
from .specs import parse_spec


def mlp(in_features: int, num_classes: int, *, width: int = 512, depth: int = 2) -> nn.Sequential:
    """``Flatten -> [Linear(width) -> ReLU] * depth -> Linear(num_classes)``.

    Raises:
        ValueError: ``width < 1``, ``depth < 0`` or either not an integer.
    """
    for name, value, low in (("width", width, 1), ("depth", depth, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def cnn(example_shape: tuple[int, ...], num_classes: int, *, channels: int = 16) -> nn.Sequential:
    """A small CNN: Conv2d for images ``(C, H, W)`` (inputs ``[B, C, H, W]``) or flat
    images ``(H, W)`` (inputs ``[B, H*W]``), Conv1d for sequences ``(L,)``.

    Uses GroupNorm (per-example safe), never BatchNorm.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if len(example_shape) == 3:
        c, h, w = example_shape
        return nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(min(4, channels), channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * math.ceil(h / 2) * math.ceil(w / 2), num_classes),
        )
    if len(example_shape) == 2:
        h, w = example_shape
        return nn.Sequential(
            nn.Unflatten(1, (1, h, w)),
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * math.ceil(h / 2) * math.ceil(w / 2), num_classes),
        )
    if len(example_shape) == 1:
        (length,) = example_shape
        return nn.Sequential(
            nn.Unflatten(1, (1, length)),
            nn.Conv1d(1, channels, 5, padding=2), nn.GroupNorm(4, channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 5, padding=2, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(channels * math.ceil(length / 2), num_classes),
        )
    raise SpecError(f"cnn: examples of shape {example_shape} are not supported (use (C, H, W), (H, W) or (L,))")


def bag(vocab_size: int, num_classes: int, *, dim: int = 32, width: int = 64) -> nn.Sequential:
    """A model of token ids ``[B, L]``: ``EmbeddingBag(vocab_size, dim, mean) -> Linear(width)
    -> ReLU -> Linear(num_classes)`` (the bag of words; token order is not used)."""
    for name, value in (("dim", dim), ("width", width), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return nn.Sequential(nn.EmbeddingBag(vocab_size, dim, mode="mean"), nn.Linear(dim, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def model_from_spec(spec: str, example_shape: tuple[int, ...], num_classes: int, *,
                    vocab_size: int | None = None) -> nn.Module:
    """Build ``mlp[:width=..,depth=..]`` or ``cnn[:channels=..]`` for the given data, or
    ``bag[:dim=..,width=..]`` for token ids (``vocab_size``: the data holds token ids)."""
    name, kwargs = parse_spec(spec)
    in_features = math.prod(example_shape)
    if (vocab_size is not None) != (name == "bag") and name in ("mlp", "cnn", "bag"):
        if vocab_size is not None:
            raise SpecError(f"the data set holds token ids, which model '{name}' cannot take; use --model bag "
                            "(an embedding bag of the tokens; options dim=, width=)")
        raise SpecError("model 'bag' takes token ids, and this data set holds features; use mlp or cnn")
    try:
        if name == "bag":
            return bag(vocab_size, num_classes, **kwargs)
        if name == "mlp":
            return mlp(in_features, num_classes, **kwargs)
        if name == "cnn":
            return cnn(example_shape, num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SpecError(f"bad options for model '{name}' in '{spec}': {e}") from None
    raise SpecError(f"unknown model '{name}': use mlp or cnn (bag for token ids)")
