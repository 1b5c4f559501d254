"""The layout's rules, checked on the source (ARCHITECTURE.md):

* no import cycles between gradsift's modules (lazy, function-level imports included: a cycle
  hidden inside a function is still a cycle of ideas);
* no module imports another module's private (``_name``) helper;
* each extension kind has one registry, and the examples of issue 11 are registered there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gradsift"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
PACKAGES = {_module_name(p) for p in ROOT.rglob("__init__.py")}


def _resolve(current: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = current if current in PACKAGES else current.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(imported gradsift module, imported name or None) for every import in ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    skip = _type_checking_nodes(tree)
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("gradsift")]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            if not base.startswith("gradsift"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None) if sub in MODULES else (base, a.name))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        targets = set()
        for target, _ in _imports(name):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A package's __init__ importing its own submodules is how packages re-export.
            if target and target != name and not (name in PACKAGES and target.startswith(name + ".")):
                targets.add(target)
        graph[name] = targets
    return graph


def _cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    # The top-level package only re-exports; importing it from inside is a cycle.
    offenders = sorted(n for n, ts in graph.items() if "gradsift" in ts and n != "gradsift")
    assert not offenders, f"modules import the top-level package (a cycle): {offenders}"
    graph.pop("gradsift", None)
    cycle = _cycle_from(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_across_modules():
    bad = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text())
        for target, imported in _imports(name):
            if imported and imported.startswith("_") and not imported.startswith("__"):
                bad.append(f"{name} imports {target}.{imported}")
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(name, node)
                for a in node.names:
                    if f"{base}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("gradsift"):
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


def test_checker_sees_a_cycle_and_a_private_import():
    # The checks above must be able to fail.
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle_from({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("kind", ["layer", "aggregator", "score"])
def test_issue_11_extensions_are_registered(kind):
    import torch

    import gradsift as gs

    if kind == "layer":
        from gradsift.layers import rule_for

        assert rule_for(torch.nn.Conv3d(1, 1, 1)) is not None
    elif kind == "aggregator":
        assert gs.aggregate.aggregator_from_spec("gaf").name.startswith("gaf")
    else:
        assert "aum" in gs.scores.score_names()


def test_public_names_in_one_import_list():
    import gradsift as gs

    source = (ROOT / "__init__.py").read_text()
    assert "noqa: E402" not in source, "gradsift/__init__.py must be one import list"
    missing = [n for n in gs.__all__ if not hasattr(gs, n)]
    assert not missing, f"__all__ names that gradsift does not define: {missing}"
    assert len(set(gs.__all__)) == len(gs.__all__)
