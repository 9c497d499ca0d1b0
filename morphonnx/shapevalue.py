"""The one evaluator of shape computations: small tensors computed from tensor shapes.

Exporters compute Reshape targets, Slice bounds, pad vectors and ConstantOfShape sizes at run time
from ``Shape`` / ``Size`` of other tensors (``x.view(x.size(0), -1)``, torch ``chunk``), through
integer arithmetic. Shape inference (pinning the values ONNX's data propagation misses), the
channel rules (bounds fixed by channel counts), the loader (``ConstantOfShape`` of a constant shape
is a weight) and verification (which tensors legitimately change with the channel counts) all need
the same answer, so they all ask this module, with one size limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from morphonnx.fold import FOLDS, constant_of_shape
from morphonnx.ir import Node, Shape, constant_node_size, constant_node_value

SHAPE_VALUE_LIMIT = 64
"""Elements of a shape computation's value, and of the constants it reads (shape vectors,
bounds, sizes, pads)."""

SHAPE_OPS = frozenset({"Shape", "Size"})
"""Ops whose output is a tensor's shape: where shape computations start."""


@dataclass
class ShapeValues:
    """Values of small tensors of one graph, each computed once (``value``).

    ``constant(t)`` is the value of a constant tensor, or None when ``t`` is not one (an
    initializer too big to be a shape vector is best reported as None too: nothing here reads it).
    ``producer(t)`` is the node computing ``t``. ``shape_of(t)`` is the shape ``Shape`` / ``Size``
    report for ``t``, or None when it is not fully known."""

    constant: Callable[[str], np.ndarray | None]
    producer: Callable[[str], Node | None]
    shape_of: Callable[[str], Shape | None]
    _memo: dict[str, np.ndarray | None] = field(default_factory=dict)

    def value(self, tensor: str) -> np.ndarray | None:
        """``tensor``'s value (integer, boolean or float, at most ``SHAPE_VALUE_LIMIT``
        elements) from constants and the known shapes, through the ops constant folding knows
        and ``ConstantOfShape``; None when it is not such a computation."""
        stack: list[tuple[str, Node | None]] = [(tensor, None)]
        path: set[str] = set()  # expanded, not yet computed: the current chain of producers
        while stack:  # depth first without recursion: chains of shape arithmetic can be long
            t, expanded = stack.pop()
            if expanded is not None:
                inputs = [self._memo.get(i) if i else None for i in expanded.inputs]
                self._memo[t] = _checked(_apply(expanded, inputs, self.shape_of))
                path.discard(t)
                continue
            if t in self._memo:
                continue
            node = self._leaf_or_node(t)
            if not isinstance(node, Node) or t in path:  # a leaf, or a cycle
                self._memo[t] = None if isinstance(node, Node) else node
                continue
            path.add(t)
            stack.append((t, node))
            if node.op_type not in SHAPE_OPS:  # those read their input's shape, not its value
                stack.extend((i, None) for i in node.inputs if i and i not in self._memo)
        return self._memo[tensor]

    def _leaf_or_node(self, tensor: str) -> np.ndarray | Node | None:
        """The value of a leaf (a constant, a shape of a known tensor), else the node to apply."""
        c = self.constant(tensor)
        if c is not None:
            return _checked(c)
        node = self.producer(tensor)
        if node is None or not node.standard or node.outputs[:1] != [tensor]:
            return None
        if node.op_type == "Constant":
            if "sparse_value" in node.attrs or constant_node_size(node) > SHAPE_VALUE_LIMIT:
                return None
            try:
                return _checked(constant_node_value(node))
            except Exception:  # no value attribute, or a malformed tensor: not a shape value
                return None
        if node.op_type in SHAPE_OPS or node.op_type == "ConstantOfShape":
            return node if node.inputs[:1] != [""] else None
        return node if node.op_type in FOLDS and node.inputs else None


def _apply(
    node: Node, inputs: list[np.ndarray | None], shape_of: Callable[[str], Shape | None]
) -> np.ndarray | None:
    if node.op_type in SHAPE_OPS:
        shape = shape_of(node.inputs[0])
        if shape is None or any(d < 0 for d in shape):
            return None
        dims = np.array(shape, dtype=np.int64)
        if node.op_type == "Size":
            return np.array(math.prod(shape), dtype=np.int64)
        return dims[node.attr("start", 0) : node.attr("end", None)]
    if any(v is None for t, v in zip(node.inputs, inputs, strict=True) if t):
        return None
    try:
        if node.op_type == "ConstantOfShape":
            size = inputs[0]
            assert size is not None
            shape = tuple(int(d) for d in size.reshape(-1))
            if size.ndim > 1 or any(d < 0 for d in shape) or math.prod(shape) > SHAPE_VALUE_LIMIT:
                return None
            return constant_of_shape(node, shape)
        return np.asarray(FOLDS[node.op_type](node, inputs))
    except Exception:  # malformed: not a shape computation this can follow
        return None


def _checked(value: np.ndarray | None) -> np.ndarray | None:
    """``value`` when it is numeric and small enough to be a shape value."""
    if value is None or value.dtype.kind not in "iubf" or value.size > SHAPE_VALUE_LIMIT:
        return None
    return value


def small_initializers(tensors: Iterable[onnx.TensorProto]) -> dict[str, np.ndarray]:
    """Values of the initializers small enough to be shape values (stored in the file itself)."""
    return {
        t.name: numpy_helper.to_array(t)
        for t in tensors
        if math.prod(t.dims) <= SHAPE_VALUE_LIMIT and t.data_location != onnx.TensorProto.EXTERNAL
    }


def graph_values(
    nodes: Iterable[Node],
    constants: Mapping[str, np.ndarray],
    shapes: Callable[[str], Shape | None] = lambda t: None,
) -> ShapeValues:
    """A :class:`ShapeValues` over a node list, constants given by value."""
    producer = {out: n for n in nodes for out in n.outputs if out}
    return ShapeValues(constants.get, producer.get, shapes)


def shape_derived(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from tensor shapes (``Shape``, ``Size`` and what follows from them and
    constants only, through any op, in graph order): they change when channels are removed."""
    consts = {t.name for t in graph.initializer}
    derived: set[str] = set()
    for n in graph.node:
        if n.op_type in SHAPE_OPS:
            derived.update(n.output)
        elif n.op_type == "Constant":
            consts.update(n.output)
        elif n.input and all(t in derived or t in consts or not t for t in n.input):
            if any(t in derived for t in n.input):
                derived.update(n.output)
            else:  # computed from constants only (Cast(Concat(Unsqueeze(Constant)))): constant
                consts.update(n.output)
    return derived
