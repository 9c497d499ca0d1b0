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

import numpy as np
import onnx
from onnx import numpy_helper

from morphonnx.fold import FOLDS, constant_of_shape, source_axis
from morphonnx.ir import Constant, Node, Shape, TensorInfo, constant_node_value
from morphonnx.protoscan import LazyWeights

SMALL_VALUE_LIMIT = 4096
"""Elements of a stored constant that rules and rewrites read as a value (axes, shapes, indices)."""


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

    def stored(self, name: str, axis: int) -> tuple[str, int]:
        """The constant ``name`` is a view of, and the axis there that its ``axis`` is, through
        folds that only move or re-type values (``fold.source_axis``: Transpose, Cast); itself
        otherwise. What a framework trains is the stored tensor: torch exports a ``Linear`` on
        3-D inputs as ``MatMul(x, Transpose(weight))``."""
        while (c := self.constants.get(name)) is not None and c.kind == "folded" and c.node:
            node = self.by_name[c.node]
            src = source_axis(node, axis, len(c.shape))
            if src is None or not node.inputs or not self.is_const(node.inputs[0]):
                break
            name, axis = node.inputs[0], src
        return name, axis

    def small_value(self, name: str, limit: int = SMALL_VALUE_LIMIT) -> np.ndarray | None:
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
        inputs = [graph.value(t) if t else None for t in node.inputs]
        return FOLDS[node.op_type](node, inputs)
    return constant_of_shape(node, c.shape)
