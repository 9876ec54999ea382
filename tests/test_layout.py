"""The package's layout stays a one-way data path: no import cycle among qkcheck's modules
(module-level imports; a function's own lazy import is how a heavy or optional dependency
is deferred, and is not counted), and the math modules import nothing of runs, pytest or
matplotlib (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "qkcheck"
MATH = ("qkcheck.decompose", "qkcheck.bounds", "qkcheck.rotary", "qkcheck.pairs")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """qkcheck modules imported by ``path``'s module-level statements (not under
    ``if TYPE_CHECKING``), resolved to the modules that exist."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: _top_level_imports(p, modules) - {m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, …, a]``, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_qkcheck_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["qkcheck.validate"] >= {"qkcheck.decompose"}
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


@pytest.mark.parametrize("module", MATH)
def test_the_math_modules_know_nothing_of_runs_pytest_or_plotting(module):
    path = PACKAGE / (module.removeprefix("qkcheck.").replace(".", "/") + ".py")
    source = path.read_text()
    tree = ast.parse(source)
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    bad = {
        m
        for m in imported
        if m and (m.startswith(("qkcheck.runs", "qkcheck.models", "pytest", "matplotlib")))
    }
    assert not bad, bad
