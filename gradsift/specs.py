"""Spec strings (``name:key=value,key=value``) and the registries they name.

:func:`parse_spec` reads one spec; :class:`Registry` maps spec names to what they build
(aggregators, scores, layer rules share its shape), with "Known: ..." errors and type
checks of the options against the factory's signature (:func:`check_options`). The
aggregator registry itself is :data:`gradsift.aggregate.AGGREGATORS`, filled by each
aggregator's own file; :func:`gradsift.aggregate.aggregator_from_spec` reads it.
"""

from __future__ import annotations

import ast
import inspect
import types
import typing
from typing import Any, Callable, Generic, Iterator, TypeVar, Union

from .errors import SpecError

__all__ = ["parse_spec", "Registry", "check_options"]

T = TypeVar("T")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"winsorize:c=2"`` -> ``("winsorize", {"c": 2})``. Values are Python literals
    (numbers, booleans, tuples, ``None``) or else kept as strings.

    Raises:
        SpecError: an empty spec, an option without ``=``, or a key given twice.
    """
    spec = spec.strip()
    if not spec:
        raise SpecError("empty spec")
    name, _, rest = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    kwargs: dict[str, Any] = {}
    if rest.strip():
        for item in _split_top_level(rest):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise SpecError(
                    f"malformed option '{item}' in spec '{spec}': expected key=value, "
                    f"e.g. '{name}:{key or 'key'}=1'"
                )
            if key in kwargs:
                raise SpecError(f"option '{key}' is given twice in spec '{spec}'; give it once")
            try:
                kwargs[key] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key] = value.strip()
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


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether a spec value fits a parameter annotation (int, float, bool, str, None,
    unions of them; anything else is accepted and left to the factory)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def check_options(what: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Check spec options against ``factory``'s keyword parameters and their annotations.

    Raises:
        SpecError: an unknown option (naming the known ones) or a value of the wrong type
            (``c=1.5`` for an ``int``, ``True`` for a ``float``).
    """
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        hints = {}
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in options.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise SpecError(f"{what} has no option '{key}' (options: {known})")
        ann = hints.get(key)
        if ann is not None and not _accepts(ann, value):
            raise SpecError(
                f"{what}: option {key}={value!r} should be {_type_name(ann)}, e.g. "
                f"{key}={_example(ann)}"
            )


def _example(annotation: Any) -> str:
    for t, ex in ((bool, "True"), (int, "2"), (float, "0.5"), (str, "name")):
        if annotation is t or t in typing.get_args(annotation):
            return ex
    return "..."


class Registry(Generic[T]):
    """Spec name -> entry (a factory), filled by the modules that define the entries.

    Use it as a decorator (``@REG.register("mean", aliases=("sgd",))``) or call it
    (``REG.register("sven", sven)``). Iterating yields the names, sorted.
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = ()):
        """Register ``entry`` under ``name`` (and ``aliases``); without ``entry``, a decorator.

        Raises:
            ValueError: the name is taken by a different entry.
        """

        def add(e: T) -> T:
            for n in (name, *aliases):
                old = self._entries.get(n)
                if old is not None and old is not e and getattr(old, "__qualname__", None) != getattr(e, "__qualname__", 0):
                    raise ValueError(f"{self.what} '{n}' is already registered ({old!r})")
                self._entries[n] = e
            return e

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry for ``name``. Raises :class:`SpecError` naming the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise SpecError(f"unknown {self.what} '{name}'. Known: {', '.join(self)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def describe(self) -> dict[str, str]:
        """name -> first line of the entry's docstring (for CLI help and docs)."""
        return {n: (inspect.getdoc(e) or "").splitlines()[0] if inspect.getdoc(e) else ""
                for n, e in self.items()}

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self)})"
