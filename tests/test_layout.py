"""The house's layering, read from the source: which package may import which, and no
import circle inside a package (imports inside functions count; ``if TYPE_CHECKING:``
blocks do not: they never run).

    benchmarks -> testbed -> (model)       tests -> anything
    service -> model                       model -> nothing of ours
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service", "testbed", "benchmarks")
# What each package may import of the others (tests may import all of them).
ALLOWED = {
    "model": set(),
    "service": {"model"},
    "testbed": {"model"},
    "benchmarks": {"model", "service", "testbed"},
}


def _modules(package: str) -> Dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / package).rglob("*.py")
    }


def _imports(module: str, path: Path, known: Set[str] = frozenset()) -> Set[str]:
    """The modules ``module`` imports, absolute, outside ``if TYPE_CHECKING:``; ``from pkg
    import sub`` counts as importing ``pkg.sub`` alone when that is one of ``known``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}
            found.update(subs)  # a submodule imported by name
            if not subs <= set(known):
                found.add(base)  # a name defined in the module (or package) itself
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(package: str) -> Dict[str, Set[str]]:
    modules = _modules(package)
    return {
        name: {m for m in _imports(name, path, set(modules)) if m in modules and m != name}
        for name, path in modules.items()
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_what_lies_below_it(package):
    wrong = {}
    for name, path in _modules(package).items():
        others = {m.split(".")[0] for m in _imports(name, path)} & (set(PACKAGES) | {"tests"})
        bad = others - ALLOWED[package] - {package}
        if bad:
            wrong[name] = sorted(bad)
    assert not wrong, f"imports running against the layering: {wrong}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_inside_a_package(package):
    graph = _graph(package)
    state: Dict[str, int] = {}  # 1: on the path, 2: done

    def cycle_from(node: str, path: list) -> list:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = cycle_from(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = cycle_from(node, [])
            assert not found, "import circle: " + " -> ".join(found[found.index(found[-1]) :])
