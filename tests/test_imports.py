"""The package's modules import one another in one direction only: no module imports another
that imports it back (directly or through others), counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx

import morphonnx

PACKAGE = Path(morphonnx.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> networkx.DiGraph:
    """Modules of the package, an edge from each to every package module it imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = networkx.DiGraph()
    g.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from pkg import mod`` imports the module pkg.mod; otherwise pkg itself
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            g.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return g


def test_the_graph_sees_the_imports() -> None:
    g = import_graph()
    assert ("morphonnx.graph", "morphonnx.ir") in g.edges
    assert ("morphonnx.load.constants", "morphonnx.load.files") in g.edges
    assert ("morphonnx.cli", "morphonnx.api") in g.edges  # an import inside a function
    assert len(g) > 20


def test_no_import_cycles() -> None:
    cycles = list(networkx.simple_cycles(import_graph()))
    assert not cycles, " ; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_ir_depends_on_nothing_of_morphonnx() -> None:
    assert set(import_graph().successors("morphonnx.ir")) == set()
