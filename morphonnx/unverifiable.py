"""Stops for channels whose removal would change a value that verification cannot catch.

Verification compares the pruned model with the original whose dead slices are zeroed. Two kinds
of value differ from the original in *both* (so the comparison passes) or are not compared at
all, and each provably depends on the channels removed, so the channels are stopped up front:

- a tensor computed at run time from constants only (``ReduceSum(gamma)``, ``Shape(weight)``):
  zeroing or slicing a member constant changes it the same way in both models;
- a graph output, or a floating-point value computed on an activation (the attention scale
  ``1/sqrt(head_dim)`` read from q's shape), computed from ``Shape`` / ``Size`` of a tensor
  whose width it provably depends on: shape computations legitimately change inside a pruned
  model (Reshape targets follow the new widths) and are not compared, but such values are
  data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from morphonnx.channels import Channels, Slot
from morphonnx.graph import Graph
from morphonnx.ir import Node, Shape
from morphonnx.shapevalue import SHAPE_VALUE_LIMIT, ShapeValues


def stop_unverifiable(ch: Channels) -> None:
    graph = ch.graph
    slots: dict[str, list[Slot]] = {}
    for slot in ch.slots:
        slots.setdefault(slot.tensor, []).append(slot)
    for node in graph.nodes:
        reads = [t for t in node.inputs + node.implicit_inputs if t]
        if not reads or not all(graph.is_const(t) for t in reads):
            continue
        if all(graph.is_const(o) for o in node.outputs if o):
            continue  # folded: its outputs are constants prune rewrites
        if all(o in slots for o in node.outputs if o):
            continue  # a weight computed filter by filter: sliced with its channels, compared
        for t in dict.fromkeys(reads):
            for slot in slots.get(t, []):
                ch.stop(
                    slot.vars,
                    f"`{t}` is read by {node.op_type} at node `{node.name}`, which computes a "
                    "value from constants only that pruning would change",
                )
    for output in graph.outputs:  # a graph output folded from weights (ReduceSum(gamma) folded)
        producer = graph.producer.get(output)
        by = f" ({producer.op_type} at node `{producer.name}`)" if producer is not None else ""
        for t in _folded_sources(graph, output):
            for slot in slots.get(t, []):
                ch.stop(
                    slot.vars,
                    f"graph output `{output}` is computed from `{t}` alone{by}, a value pruning "
                    "would change",
                )
    for used, where, shape_node in _shape_reads_used_as_data(graph):
        x = shape_node.inputs[0]
        axis = ch.axis_of.get(x)
        if axis is None or not _depends_on_width(ch, used, x, axis, used in graph.outputs):
            continue
        ch.stop(
            ch.by_key[(x, axis)].vars,
            f"{where} is computed from the width of `{x}` "
            f"({shape_node.op_type} at node `{shape_node.name}`)",
        )


def _folded_sources(graph: Graph, name: str) -> list[str]:
    """The constants a folded constant ``name`` is computed from, transitively (none for a
    tensor that is not a folded constant)."""
    found: list[str] = []
    stack = [name]
    while stack:
        t = stack.pop()
        c = graph.constants.get(t)
        if c is None or t in found:
            continue
        found.append(t)
        producer = graph.by_name.get(c.node or "") if c.kind == "folded" else None
        if producer is not None:
            stack.extend(i for i in producer.inputs if i)
    return found if graph.constants.get(name) is not None else []


def _depends_on_width(ch: Channels, output: str, x: str, axis: int, reshaped: bool) -> bool:
    """Whether ``output``'s value provably changes with the size of ``x``'s channel axis (it is
    evaluated with that size as it is and changed); unless ``reshaped``, only a change of
    values, not of shape (zeros of ``x``'s shape shrink with it, and stay right). Where it
    cannot be evaluated, verification compares the output instead."""
    g = ch.graph

    def wider(t: str) -> Shape | None:
        shape = g.shape(t)
        if t != x or shape is None:
            return shape
        return tuple(d + 1 if i == axis else d for i, d in enumerate(shape))

    def value(shape_of: Callable[[str], Shape | None]) -> np.ndarray | None:
        values = ShapeValues(
            lambda t: g.small_value(t, SHAPE_VALUE_LIMIT), g.producer.get, shape_of
        )
        return values.value(output)

    exact, moved = value(g.shape), value(wider)
    if exact is None or moved is None or not reshaped and exact.shape != moved.shape:
        return False
    return not np.array_equal(exact, moved)


def _shape_reads_used_as_data(graph: Graph) -> list[tuple[str, str, Node]]:
    """(tensor, where it is used, Shape/Size node) for every tensor computed from tensor shapes
    and constants only that is used as data, not as a shape: a graph output, or a floating-point
    value an op computes with on an activation (the ``1/sqrt(head_dim)`` torch's
    scaled_dot_product_attention reads from q's shape); and each Shape/Size node it comes
    from."""
    derived: dict[str, list[Node]] = {}  # tensor -> the Shape/Size nodes it comes from
    found: dict[tuple[str, str], tuple[str, str, Node]] = {}
    for n in graph.nodes:
        reads = [t for t in n.inputs + n.implicit_inputs if t]
        if n.standard and n.op_type in ("Shape", "Size"):
            sources = [n]
        elif reads and all(t in derived or graph.is_const(t) for t in reads):
            sources = [s for t in reads for s in derived.get(t, [])]
            if not sources:
                continue
        else:
            for t in reads:
                dtype = graph.info(t).dtype if t in derived else None
                if dtype is not None and dtype.kind == "f":
                    where = f"`{t}`, used as data at node `{n.name}`,"
                    found.update({(t, s.name): (t, where, s) for s in derived[t]})
            continue
        for o in n.outputs:
            if o:
                derived[o] = sources
    for o in graph.outputs:
        found.update({(o, s.name): (o, f"graph output `{o}`", s) for s in derived.get(o, [])})
    return list(found.values())
