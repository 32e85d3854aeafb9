"""The architecture holds: imports flow one way (docs/design.md), and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "leanconv"
# docs/design.md, "Layout and dependency direction": a package may import only its own
# modules and the packages before it.
ORDER = ["errors", "util", "layers", "models", "data", "deploy", "cost", "checkpoint_header", "checkpoint", "train",
         "graph", "importance", "width", "prune3d", "convs", "runs", "report", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The leanconv modules ``path`` imports (``from leanconv.x import y`` counts as x.y when
    x.y is a module, else as x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("leanconv")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leanconv") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_package_has_a_place_in_the_order():
    packages = {_package(m) for m in MODULES} - {""}
    assert packages <= set(ORDER), sorted(packages - set(ORDER))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "leanconv"))
def test_imports_flow_one_way(module):
    """A module imports its own package and the packages before it, never one after it (the
    package face ``leanconv/__init__.py``, the public API, loads lazily and is exempt)."""
    mine = ORDER.index(_package(module))
    upward = [m for m in GRAPH[module] if m != "leanconv" and ORDER.index(_package(m)) > mine]
    assert not upward, f"{module} imports {upward}, which come after it in {ORDER}"


def test_no_import_cycles():
    """No module imports itself back through others (a package's ``__init__`` re-exporting
    its modules is not a cycle: the modules must not import the package face)."""
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH or nxt == "leanconv":
                continue
            if seen.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module)


def test_one_progress_type_and_one_atomic_writer():
    """The callback type and the writer are defined once, in util."""
    progress = [n for n, p in MODULES.items() if "Progress = Callable" in p.read_text()]
    writers = [n for n, p in MODULES.items() if "def atomic_write" in p.read_text() or "mkstemp" in p.read_text()]
    assert progress == ["leanconv.util.progress"] and writers == ["leanconv.util.files"]
