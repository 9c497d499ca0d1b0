"""The model as a graph: ops as nodes, tensors as edges carrying shape and dtype.

Everything downstream (channel rules, costs, pruning) reads the model through this one structure,
so the quirks of ONNX (unnamed nodes, weights hidden in ``Constant`` / ``ConstantOfShape`` nodes or
behind foldable ops such as ``Unsqueeze``, subgraphs reading outer tensors) are resolved here once.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from morphonnx.protoscan import LazyWeights

Shape = tuple[int, ...]
"""A tensor shape; unknown dims are -1."""


@dataclass
class TensorInfo:
    """What the graph knows of one tensor."""

    name: str
    shape: Shape | None
    dtype: np.dtype | None

    @property
    def known(self) -> bool:
        return self.shape is not None and all(d >= 0 for d in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None and self.known else 0

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize if self.dtype is not None else 4


@dataclass
class Node:
    """One ONNX node, with a unique stable name and its attributes as Python values."""

    index: int
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    implicit_inputs: list[str] = field(default_factory=list)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    @property
    def standard(self) -> bool:
        """True for ops of the default ONNX domain (the only ones our rule table knows)."""
        return self.domain in ("", "ai.onnx")


@dataclass
class Constant:
    """Where a constant tensor's values live: an initializer, a Constant node or ConstantOfShape,
    a folded computation, or (``copy``) a per-consumer copy of a shared per-channel constant."""

    name: str
    kind: str  # "initializer" | "constant_node" | "constant_of_shape" | "folded" | "copy"
    shape: Shape
    dtype: np.dtype
    node: str | None = None  # producing node for the node kinds; the consumer for a copy
    source: str | None = None  # for a copy: the constant it copies
    input_index: int = -1  # for a copy: which input of ``node`` reads it


@dataclass
class Graph:
    """The loaded model: ONNX proto, node list in topological order, tensors and constants."""

    model: onnx.ModelProto
    path: Path
    nodes: list[Node]
    tensors: dict[str, TensorInfo]
    constants: dict[str, Constant]
    inputs: list[str]
    outputs: list[str]
    opset: int
    lazy: LazyWeights | None = None
    batch_used: bool = False  # some input had a dynamic batch dim that ``batch`` filled
    _values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @cached_property
    def producer(self) -> dict[str, Node]:
        return {out: n for n in self.nodes for out in n.outputs if out}

    @cached_property
    def consumers(self) -> dict[str, list[Node]]:
        result: dict[str, list[Node]] = {}
        for n in self.nodes:
            for t in dict.fromkeys(n.inputs + n.implicit_inputs):
                if t:
                    result.setdefault(t, []).append(n)
        return result

    @cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.model.graph.initializer}

    @cached_property
    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def is_const(self, name: str) -> bool:
        return bool(name) and name in self.constants

    def shape(self, name: str) -> Shape | None:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        c = self.constants.get(name)
        if c is not None:
            return TensorInfo(name, c.shape, c.dtype)
        return self.tensors.get(name) or TensorInfo(name, None, None)

    def value(self, name: str) -> np.ndarray:
        """The values of a constant (loaded on first use: analyze never touches big weights)."""
        if name not in self._values:
            self._values[name] = _constant_value(self, self.constants[name])
        return self._values[name]

    def materialized_copies(self, changed: Collection[str]) -> list[str]:
        """Constants that a pruned model stores as initializers of their own because what they
        are computed from changes while they keep their old values: copies of shared
        per-channel constants, and folded constants (``b2 = Identity(b1)``, as PyTorch exports
        equal biases) read by a layer whose channels stay."""
        moved = set(changed)
        found = []
        for name, c in self.constants.items():  # in graph order: folded chains resolve in one pass
            if c.kind == "copy":
                sources = [c.source or ""]
            elif c.kind == "folded":
                sources = self.by_name[c.node or ""].inputs
            else:
                continue
            if name not in moved and any(t in moved for t in sources):
                found.append(name)
        return found

    def small_value(self, name: str, limit: int = 4096) -> np.ndarray | None:
        """Values of a small constant (shape vectors, axes, pads), or None when not constant."""
        c = self.constants.get(name)
        if c is None or math.prod(c.shape) > limit:
            return None
        return self.value(name)


def _constant_value(graph: Graph, c: Constant) -> np.ndarray:
    if c.kind == "initializer":
        tensor = graph.initializers[c.name]
        if graph.lazy is not None and c.name in graph.lazy.spans and not tensor.raw_data:
            return graph.lazy.weight(tensor)  # read-only view on the mapped file
        return numpy_helper.to_array(tensor, base_dir=str(graph.path.parent))
    node = graph.by_name[c.node or ""]
    if c.kind == "constant_node":
        return constant_node_value(node)
    if c.kind == "copy":
        assert c.source is not None
        return graph.value(c.source)
    if c.kind == "folded":
        from morphonnx.fold import FOLDS

        inputs = [graph.value(t) if t else None for t in node.inputs]
        return FOLDS[node.op_type](node, inputs)
    fill = node.attr("value")
    fill_value = numpy_helper.to_array(fill).reshape(-1)[0] if fill is not None else 0.0
    return np.full(c.shape, fill_value, dtype=c.dtype)


def constant_node_value(node: Node) -> np.ndarray:
    """The value of a ``Constant`` node, whichever of its attribute spellings it uses."""
    a = node.attrs
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    if "value_string" in a:
        return np.array(a["value_string"])
    if "value_strings" in a:
        return np.array(a["value_strings"])
    raise ValueError(f"Constant node {node.name} has no value attribute")


def attribute_values(proto: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values; strings decoded, subgraphs kept as protos."""
    out: dict[str, Any] = {}
    for a in proto.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode("utf-8", "replace") for x in v]
        out[a.name] = v
    return out


def subgraph_outer_inputs(proto: onnx.NodeProto) -> list[str]:
    """Tensors a node's subgraphs read from the enclosing scope (If/Loop/Scan bodies)."""
    found: list[str] = []
    for a in proto.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                inner = list(n.input) + subgraph_outer_inputs(n)
                found.extend(t for t in inner if t and t not in local and t not in found)
    return found
