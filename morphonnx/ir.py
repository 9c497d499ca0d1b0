"""The IR's plain data types: shapes, tensors, nodes, constants (numpy and onnx only).

Every other module builds on these, so this module imports nothing of morphonnx: the loader, the
graph, constant folding and the shape-value evaluator can all use them without importing each
other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

Shape = tuple[int, ...]
"""A tensor shape; unknown dims are -1."""

ConstantKind = Literal["initializer", "constant_node", "constant_of_shape", "folded", "copy"]
"""Where a constant's values live (see :class:`Constant`)."""


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

    @classmethod
    def from_proto(cls, proto: onnx.NodeProto, index: int = 0, name: str | None = None) -> Node:
        return cls(
            index=index,
            name=proto.name if name is None else name,
            op_type=proto.op_type,
            domain=proto.domain,
            inputs=list(proto.input),
            outputs=list(proto.output),
            attrs=attribute_values(proto),
            implicit_inputs=subgraph_outer_inputs(proto),
        )


@dataclass
class Constant:
    """Where a constant tensor's values live: an initializer, a Constant node or ConstantOfShape,
    a folded computation, or (``copy``) a per-consumer copy of a shared per-channel constant."""

    name: str
    kind: ConstantKind
    shape: Shape
    dtype: np.dtype
    node: str | None = None  # producing node for the node kinds; the consumer for a copy
    source: str | None = None  # for a copy: the constant it copies
    input_index: int = -1  # for a copy: which input of ``node`` reads it


def np_dtype(code: int) -> np.dtype | None:
    """The numpy dtype of an ONNX element type, or None for an unknown code."""
    if code == onnx.TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(code))
    except (KeyError, TypeError, ValueError):
        return None


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


def constant_node_size(node: Node) -> int:
    """Elements of a ``Constant`` node's value, read without converting it."""
    a = node.attrs
    if "value" in a:
        return math.prod(a["value"].dims)
    for key in ("value_floats", "value_ints", "value_strings"):
        if key in a:
            return len(a[key])
    return 1


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
