"""The package's import graph: no cycles, and no private names imported across modules.

Read from the source, not from ``sys.modules``: every ``import`` of an ``rnnkit`` module,
at the top of a file or inside a function (a lazy import that breaks a cycle at run time
still ties the two modules together), is an edge. ``from rnnkit.a import b`` is an edge to
``rnnkit.a.b`` where that is a module, else to ``rnnkit.a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rnnkit

ROOT = Path(rnnkit.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every rnnkit import in the file of module ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((base, [alias.name for alias in node.names]))
    return [(m, names) for m, names in found if m == "rnnkit" or m.startswith("rnnkit.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            if len(targets) < len(names) or not names:
                targets.append(module)
            graph[name].update(t for t in targets if t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in import order), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
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


def test_the_package_has_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # the cycle this package once had, through a lazy import in a function
    graph = _graph()
    graph["rnnkit.engines.cpu.function"].add("rnnkit.functional")
    assert _cycle(graph) is not None


def test_no_private_names_are_imported_across_modules():
    """What modules share has a public name."""
    private = [
        f"{name} imports {module}.{n}"
        for name, path in MODULES.items()
        for module, names in _imports(name, path)
        for n in names
        if n.startswith("_") and n != "__version__"
    ]
    assert not private, "\n".join(private)
