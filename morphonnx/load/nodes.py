"""Nodes of the file as :class:`~morphonnx.ir.Node`: unique stable names, topological order, and
every tensor a node reads defined (a truncated or hand-broken file fails here)."""

from __future__ import annotations

import heapq
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
    """Graph order when it is already topological (the common case); otherwise a stable
    topological sort (Kahn's, lowest index first), in linear time. Nodes in a cycle, or after
    one, go last, where ``check_references`` reports the cycle."""
    available = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    available.add("")
    done = set(available)
    for n in nodes:
        if any(t not in done for t in n.inputs + n.implicit_inputs):
            break
        done.update(n.outputs)
    else:
        return nodes
    successors = _successors(nodes)
    waiting = {n.index: 0 for n in nodes}
    for targets in successors.values():
        for j in targets:
            waiting[j] += 1
    ready = [i for i, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in successors.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    placed = set(order)
    order += sorted(i for i in waiting if i not in placed)
    by_index = {n.index: n for n in nodes}
    return [by_index[i] for i in order]


def _successors(nodes: list[Node]) -> dict[int, list[int]]:
    """Node index -> indices of the nodes reading its outputs (each edge once)."""
    producer = {out: n.index for n in nodes for out in n.outputs if out}
    edges: dict[int, list[int]] = {}
    for n in nodes:
        reads = n.inputs + n.implicit_inputs
        for src in dict.fromkeys(producer[t] for t in reads if t in producer):
            edges.setdefault(src, []).append(n.index)
    return edges


def _one_cycle(nodes: list[Node]) -> list[Node]:
    """One cycle among ``nodes`` (depth-first, linear time; never every cycle, whose number
    grows exponentially with a dense graph), in the order its edges run."""
    import networkx

    g = networkx.DiGraph()
    g.add_edges_from((i, j) for i, targets in _successors(nodes).items() for j in targets)
    by_index = {n.index: n for n in nodes}
    try:
        return [by_index[i] for i, _ in networkx.find_cycle(g)]
    except networkx.NetworkXNoCycle:
        return []


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
            cycle = [m.name for m in _one_cycle(nodes)]
            shown = " -> ".join(cycle[:5] + (["..."] if len(cycle) > 5 else []) + cycle[:1])
            raise MorphonnxError(f"{p}: the graph has a cycle: {shown}")
        done.update(n.outputs)
    for o in model.graph.output:
        if o.name not in known:
            raise MorphonnxError(f"{p}: graph output '{o.name}' is not produced by any node")
