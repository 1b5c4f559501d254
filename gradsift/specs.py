"""Parse ``name:key=value,key=value`` spec strings (aggregators, optimizers)."""

from __future__ import annotations

import ast
from typing import Any

from .errors import SpecError


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"winsorize:c=2"`` -> ``("winsorize", {"c": 2})``. Values are Python literals
    (numbers, booleans, tuples) or else kept as strings."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty spec")
    name, _, rest = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    kwargs: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top_level(rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SpecError(
                    f"malformed option '{item}' in spec '{spec}': expected key=value, "
                    f"e.g. '{name}:{key.strip() or 'key'}=1'"
                )
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
    return name, kwargs


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``betas=(0.9,0.99),lr=1`` -> 2 items."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur)
    return [i.strip() for i in items if i.strip()]


def aggregator_from_spec(spec: str):
    """Build an aggregator from a spec: ``"mean"``, ``"winsorize:c=2"``,
    ``"trimmed_mean:fraction=0.1"``, ``"clip:max_norm=1+mean"`` (``+`` chains)."""
    from . import aggregate

    parts = [p for p in spec.split("+") if p.strip()]
    if not parts:
        raise SpecError(f"empty aggregator spec '{spec}'")
    built = []
    for part in parts:
        name, kwargs = parse_spec(part)
        factory = AGGREGATOR_FACTORIES().get(name)
        if factory is None:
            known = ", ".join(sorted(AGGREGATOR_FACTORIES()))
            raise SpecError(f"unknown aggregator '{name}' in '{spec}'. Known: {known}")
        try:
            built.append(factory(**kwargs))
        except (TypeError, ValueError) as e:
            raise SpecError(f"bad options for aggregator '{name}' in '{spec}': {e}") from None
    return built[0] if len(built) == 1 else aggregate.chain(*built)


def AGGREGATOR_FACTORIES() -> dict:
    """Aggregator factories by spec name (extended by later modules via registration)."""
    from . import aggregate

    return {
        "mean": aggregate.mean,
        "sgd": aggregate.mean,
        "winsorize": aggregate.winsorize,
        "m3": aggregate.m3,
        "rm3": aggregate.rm3,
        "trimmed_mean": aggregate.trimmed_mean,
        "coordinate_median": aggregate.coordinate_median,
        "median": aggregate.coordinate_median,
        "clip": aggregate.clip,
        "drop_nonfinite": aggregate.drop_nonfinite,
        **_EXTRA_AGGREGATORS,
    }


_EXTRA_AGGREGATORS: dict = {}


def register_aggregator(name: str, factory) -> None:
    """Make ``factory`` available to specs under ``name`` (used by extension modules)."""
    _EXTRA_AGGREGATORS[name] = factory
