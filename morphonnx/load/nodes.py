"""Nodes of the file as :class:`~morphonnx.ir.Node`: unique stable names, topological order, and
every tensor a node reads defined (a truncated or hand-broken file fails here)."""

from __future__ import annotations

from pathlib import Path

import onnx

from morphonnx.errors import MorphonnxError
from morphonnx.ir import Node


def make_nodes(model: onnx.ModelProto) -> list[Node]:
    """Nodes with unique stable names, in topological order.

    A node without a name, or whose name an earlier node already has, is called
    ``{op_type}_{index}`` (with a ``_k`` suffix if that clashes), so names depend only on the file.
    """
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    nodes: list[Node] = []
    for i, proto in enumerate(model.graph.node):
        name = proto.name
        if not name or name in seen:
            base = f"{proto.op_type}_{i}"
            name = base
            k = 1
            while name in taken or name in seen:
                name = f"{base}_{k}"
                k += 1
        seen.add(name)
        nodes.append(Node.from_proto(proto, i, name))
    return topological(nodes, model)


def topological(nodes: list[Node], model: onnx.ModelProto) -> list[Node]:
    """Graph order when it is already topological (the common case); otherwise a stable sort of
    the op graph in networkx (nodes in a cycle go last, where ``check_references`` reports them)."""
    available = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    available.add("")
    done = set(available)
    for n in nodes:
        if any(t not in done for t in n.inputs + n.implicit_inputs):
            break
        done.update(n.outputs)
    else:
        return nodes
    import networkx

    producer = {out: n.index for n in nodes for out in n.outputs if out}
    g = networkx.DiGraph()
    g.add_nodes_from(n.index for n in nodes)
    g.add_edges_from(
        (producer[t], n.index) for n in nodes for t in n.inputs + n.implicit_inputs if t in producer
    )
    try:
        order = list(networkx.lexicographical_topological_sort(g))
    except networkx.NetworkXUnfeasible:
        cyclic = {i for c in networkx.simple_cycles(g) for i in c}
        acyclic = g.subgraph(
            i for i in g if i not in cyclic and not (networkx.ancestors(g, i) & cyclic)
        )
        order = list(networkx.lexicographical_topological_sort(acyclic))
        order += sorted(set(g) - set(order))
    by_index = {n.index: n for n in nodes}
    return [by_index[i] for i in order]


def check_references(p: Path, model: onnx.ModelProto, nodes: list[Node]) -> None:
    """Every tensor a node reads must exist (a truncated or hand-broken file fails here)."""
    known = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    known.add("")
    for n in nodes:
        known.update(n.outputs)
    for n in nodes:
        for t in n.inputs + n.implicit_inputs:
            if t not in known:
                raise MorphonnxError(
                    f"{p}: node '{n.name}' reads tensor '{t}' that nothing defines"
                )
    done = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input} | {""}
    for n in nodes:  # topological() sorted all it could: a late read now means a cycle
        late = next((t for t in n.inputs + n.implicit_inputs if t not in done), None)
        if late is not None:
            raise MorphonnxError(
                f"{p}: the graph has a cycle: node '{n.name}' reads tensor '{late}', "
                "which depends on the node's own output"
            )
        done.update(n.outputs)
    for o in model.graph.output:
        if o.name not in known:
            raise MorphonnxError(f"{p}: graph output '{o.name}' is not produced by any node")
