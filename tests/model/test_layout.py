"""The shape of model/: its modules import each other without a circle (imports inside
functions count: one there only hides a circle from Python), each at the top of the
file, and nothing in it imports the server, the benchmarks or the tests (``import
model`` needs no web framework).

The graph is read from the sources with ``ast``, not by importing them.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

import model

ROOT = Path(model.__file__).parent
PACKAGE = "model"
OUTSIDE = ("service", "benchmarks", "tests")  # what model/ never imports


def _modules() -> Dict[str, Path]:
    """``{"model.export": path, ...}``; the package's ``__init__`` is ``model``."""
    found = {}
    for path in sorted(ROOT.glob("*.py")):
        found[PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"] = path
    return found


def _imported(node: ast.AST, module: str, known: Set[str]) -> List[str]:
    """The absolute names one import statement in ``module`` brings in: for ``from X
    import name`` the submodule ``X.name`` when there is one, else ``X``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module if module == PACKAGE else module.rsplit(".", 1)[0]
        base_parts = package.split(".")
        base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    names = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        names.append(sub if sub in known else source)
    return names


def import_graph(modules: Optional[Dict[str, Path]] = None) -> Dict[str, Set[str]]:
    """For each module of model/, everything it imports (module level and inside functions)."""
    modules = modules if modules is not None else _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        imports: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imports.update(_imported(node, name, set(modules)))
        graph[name] = imports
    return graph


def _within(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """The graph restricted to model/'s own modules (``model.x.y`` counts as ``model.x``)."""
    inside: Dict[str, Set[str]] = {}
    for name, imports in graph.items():
        edges = set()
        for target in imports:
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        inside[name] = edges
    return inside


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A circle in ``graph`` (``[a, b, ..., a]``), or None when it is acyclic."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_model_imports_no_module_in_a_circle():
    graph = _within(import_graph())
    assert len(graph) >= 20 and "model.loading" in graph and "model.export" in graph["model.loading"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_model_never_imports_the_server_the_benchmarks_or_the_tests():
    found = {
        f"{name} imports {target}"
        for name, imports in import_graph().items()
        for target in imports
        if target.split(".")[0] in OUTSIDE
    }
    assert found == set()


def test_model_imports_its_own_modules_at_the_top():
    """Inside a function only what is optional or heavy is imported (a private part of
    torch, say), never one of model/'s modules: that is how the circles were hidden."""
    modules = _modules()
    late = []
    for name, path in modules.items():
        for func in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    targets = _imported(node, name, set(modules))
                    late += [f"{name}:{node.lineno} {t}" for t in targets if t.split(".")[0] == PACKAGE]
    assert late == []


def test_nothing_imports_the_package_init():
    """``from . import __version__`` (the version lives in model/version.py) would run
    ``__init__``, which imports nearly everything, back from inside it."""
    graph = _within(import_graph())
    assert {name for name, edges in graph.items() if PACKAGE in edges} == set()


@pytest.mark.parametrize(
    "sources, cycle",
    [
        ({"a": "from .b import x", "b": "def f():\n    from .a import y"}, True),  # hidden in a function
        ({"a": "from . import b", "b": "import model.a"}, True),
        ({"a": "from . import version", "b": "from .a import x", "version": ""}, False),
        ({"a": "from .b import x", "b": "from .c import y", "c": "import torch"}, False),
        ({"a": "from service import app", "b": ""}, False),  # outside: not a circle, found by the other test
    ],
)
def test_the_graph_is_read_like_python_reads_it(tmp_path, sources, cycle):
    modules = {}
    for stem, text in sources.items():
        (tmp_path / f"{stem}.py").write_text(text)
        modules[f"{PACKAGE}.{stem}"] = tmp_path / f"{stem}.py"
    graph = _within(import_graph(modules))
    assert (find_cycle(graph) is not None) is cycle, graph
