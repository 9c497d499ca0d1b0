"""Shape inference on a copy of the graph *without* its big weights (they become typed graph
inputs), because ``onnx.shape_inference`` serializes the whole model, weights included; shape
values ONNX's data propagation misses are computed by :mod:`morphonnx.shapevalue` and pinned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from morphonnx.errors import MorphonnxError
from morphonnx.ir import Constant, Node, Shape, TensorInfo, np_dtype
from morphonnx.shapevalue import graph_values, small_initializers

SMALL_CONSTANT = 1024
"""Constants up to this many elements stay in the shape-inference copy (shape vectors, axes)."""


def infer_tensor_shapes(
    p: Path,
    model: onnx.ModelProto,
    fixed: Mapping[str, Sequence[int]],
    constants: Mapping[str, Constant],
    order: Sequence[int] | None = None,
) -> dict[str, TensorInfo]:
    """Run ONNX shape inference on a weight-free copy of the graph with concrete input shapes."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    big_constant_nodes = {
        c.name
        for c in constants.values()
        if c.kind == "constant_node" and int(np.prod(c.shape)) > SMALL_CONSTANT
    }
    protos = model.graph.node
    for n in (protos[i] for i in order) if order is not None else protos:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
            if n.output[0] in big_constant_nodes:
                continue  # becomes a typed graph input below
        g.node.append(n)
    for vi in model.graph.input:
        if vi.name in fixed:
            elem = vi.type.tensor_type.elem_type
            g.input.append(helper.make_tensor_value_info(vi.name, elem, list(fixed[vi.name])))
        elif vi.name not in constants:
            g.input.append(vi)
    for t in model.graph.initializer:
        if int(np.prod(t.dims)) <= SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
            if model.ir_version < 4:  # IR 3 only sees initializers that are also graph inputs
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for c in constants.values():
        if c.kind == "constant_node" and int(np.prod(c.shape)) > SMALL_CONSTANT:
            elem = helper.np_dtype_to_tensor_dtype(c.dtype)
            g.input.append(helper.make_tensor_value_info(c.name, elem, list(c.shape)))
    for o in model.graph.output:
        g.output.append(helper.make_value_info(o.name, _type_without_shape(o.type)))
    custom_outputs = {
        out for n in model.graph.node if n.domain not in ("", "ai.onnx") for out in n.output
    }
    g.value_info.extend(v for v in model.graph.value_info if v.name in custom_outputs)
    tensors = _infer(p, light)
    for _ in range(50):  # each round resolves one more level of shape arithmetic
        if all(t.known for t in tensors.values()):
            break
        pinned = _pin_shape_values(light, tensors)
        if not (_declare_same_shape(light, tensors) or pinned):
            break
        tensors = _infer(p, light)
    for vi in model.graph.output:
        declared = _info(vi)
        if vi.name not in tensors or tensors[vi.name].shape is None:
            tensors[vi.name] = declared
    return tensors


def _infer(p: Path, light: onnx.ModelProto) -> dict[str, TensorInfo]:
    try:
        inferred = onnx.shape_inference.infer_shapes(
            light, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:
        msg = " ".join(str(exc).split())
        raise MorphonnxError(f"{p}: shape inference failed: {msg[:300]}") from None
    ig = inferred.graph
    return {vi.name: _info(vi) for vi in list(ig.input) + list(ig.value_info) + list(ig.output)}


def _pin_shape_values(light: onnx.ModelProto, tensors: Mapping[str, TensorInfo]) -> bool:
    """Where ONNX's data propagation gives up (a Reshape target computed from ``Shape`` before
    opset 14, in many exporters' graphs), compute those small integer tensors here, from the
    shapes already known, and give them to the shape-inference copy as constants.

    Only the weight-free copy changes: in the model the targets are still computed at run time,
    so they follow the pruned shapes. Returns whether anything new was pinned."""
    g = light.graph
    nodes = [Node.from_proto(proto) for proto in g.node]
    values = graph_values(nodes, small_initializers(g.initializer), lambda t: _shape(tensors, t))
    produced = {t for n in nodes for t in n.outputs}
    pinned: set[str] = set()
    for proto in g.node:
        for i, t in enumerate(proto.input):
            v = values.value(t) if t in produced else None
            if v is None or v.dtype.kind not in "iuf":
                continue
            name = f"{t}__morphonnx_value"
            if name not in pinned:
                g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
                if light.ir_version < 4:
                    g.input.append(
                        helper.make_tensor_value_info(
                            name, g.initializer[-1].data_type, list(v.shape)
                        )
                    )
                pinned.add(name)
            proto.input[i] = name
    return bool(pinned)


SAME_SHAPE_WITHOUT_INFERENCE = ("GroupNormalization",)
"""Standard ops whose output has the input's shape but that ONNX shape inference leaves untyped
(function ops without an inference function)."""


def _declare_same_shape(light: onnx.ModelProto, tensors: Mapping[str, TensorInfo]) -> bool:
    """Give the outputs of :data:`SAME_SHAPE_WITHOUT_INFERENCE` their input's type, so inference
    goes on past them. Returns whether anything new was declared."""
    g = light.graph
    declared = {v.name for v in g.value_info}
    added = False
    for n in g.node:
        if n.op_type not in SAME_SHAPE_WITHOUT_INFERENCE or n.domain not in ("", "ai.onnx"):
            continue
        x = tensors.get(n.input[0]) if n.input else None
        y = n.output[0] if n.output else ""
        if x is None or not x.known or x.dtype is None or not y or y in declared:
            continue
        elem = helper.np_dtype_to_tensor_dtype(x.dtype)
        g.value_info.append(helper.make_tensor_value_info(y, elem, list(x.shape or ())))
        added = True
    return added


def _shape(tensors: Mapping[str, TensorInfo], name: str) -> Shape | None:
    info = tensors.get(name)
    return info.shape if info is not None and info.known else None


def _type_without_shape(t: onnx.TypeProto) -> onnx.TypeProto:
    out = onnx.TypeProto()
    out.CopyFrom(t)
    if out.HasField("tensor_type"):
        out.tensor_type.ClearField("shape")
    return out


def _info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return TensorInfo(vi.name, None, None)
    dtype = np_dtype(t.elem_type) if t.elem_type else None
    shape: Shape | None = None
    if t.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else -1 for d in t.shape.dim
        )
    return TensorInfo(vi.name, shape, dtype)
