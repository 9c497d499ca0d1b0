"""Which tensors are constants, and where their values live: initializers (checked against
their declared type and size), ``Constant`` nodes, ``ConstantOfShape`` of a constant shape, folded
computations, and per-consumer copies of shared per-channel constants."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from morphonnx.errors import MorphonnxError
from morphonnx.fold import FOLDS
from morphonnx.ir import Constant, Node, TensorInfo, constant_node_value, np_dtype
from morphonnx.load.files import check_initializer
from morphonnx.ops import op_kind
from morphonnx.protoscan import LazyWeights
from morphonnx.shapevalue import graph_values, small_initializers


def find_constants(
    model: onnx.ModelProto,
    nodes: list[Node],
    path: Path | None = None,
    lazy: LazyWeights | None = None,
) -> dict[str, Constant]:
    """Initializers, ``Constant`` outputs and ``ConstantOfShape`` of a constant shape (weights)."""
    constants: dict[str, Constant] = {}
    spans = lazy.spans if lazy is not None else {}
    for t in model.graph.initializer:
        span = spans.get(t.name)
        stored = span[1] - span[0] if span else len(t.raw_data)
        dtype = check_initializer(path, t, stored)
        constants[t.name] = Constant(t.name, "initializer", tuple(t.dims), dtype)
    shape_values = graph_values(nodes, small_initializers(model.graph.initializer))
    for n in nodes:
        if not n.standard or not n.outputs:
            continue
        out = n.outputs[0]
        if n.op_type == "Constant" and "sparse_value" not in n.attrs:
            try:
                v = constant_node_value(n)
            except Exception as exc:  # no value attribute, or a malformed tensor
                msg = " ".join(str(exc).split())[:200]
                raise MorphonnxError(
                    f"{path}: Constant node '{n.name}' is invalid ({msg})"
                ) from None
            constants[out] = Constant(out, "constant_node", tuple(v.shape), v.dtype, node=n.name)
        elif n.op_type == "ConstantOfShape":
            shape_value = shape_values.value(n.inputs[0]) if n.inputs else None
            if shape_value is None:
                continue
            fill = n.attr("value")
            fill_dtype = np_dtype(fill.data_type) if fill is not None else np.dtype(np.float32)
            shape = tuple(int(d) for d in shape_value.reshape(-1))
            if fill_dtype is None or any(d < 0 for d in shape):
                continue  # not a well-formed constant; shape inference decides what it is
            constants[out] = Constant(out, "constant_of_shape", shape, fill_dtype, node=n.name)
    return constants


def fold_constants(
    nodes: list[Node], constants: dict[str, Constant], tensors: Mapping[str, TensorInfo]
) -> None:
    """Outputs of foldable ops whose inputs are all constant become (folded) constants."""
    for n in nodes:
        if not n.standard or n.op_type not in FOLDS or len(n.outputs) != 1:
            continue
        if not all(t == "" or t in constants for t in n.inputs) or not n.inputs[0]:
            continue
        info = tensors.get(n.outputs[0])
        if info is None or info.shape is None or not info.known or info.dtype is None:
            continue
        constants[n.outputs[0]] = Constant(
            n.outputs[0], "folded", info.shape, info.dtype, node=n.name
        )


def unshare_per_channel_constants(nodes: list[Node], constants: dict[str, Constant]) -> None:
    """Give every further reader of a shared per-channel constant its own copy.

    Exporters de-duplicate equal constants (tf2onnx does, for the identical BN statistics of a
    freshly initialised Keras model); read by unrelated layers, one shared vector would tie their
    channels into one group. The copies exist in the graph's view (``prune`` writes them as
    initializers only where it has to); weights of Conv/Gemm/MatMul stay shared."""
    uses: dict[str, list[tuple[Node, int]]] = {}
    for n in nodes:
        if all(o in constants for o in n.outputs if o):
            continue  # computes constants only
        for i, t in enumerate(n.inputs):
            if t in constants:
                uses.setdefault(t, []).append((n, i))
    for t, readers in uses.items():
        c = constants[t]
        if len(readers) < 2 or c.dtype.kind != "f" or math.prod(c.shape) <= 1:
            continue
        if not all(op_kind(n).per_channel for n, _ in readers):
            continue
        for k, (n, i) in enumerate(readers[1:], start=1):
            name = f"{t}__copy{k}"
            n.inputs[i] = name
            constants[name] = Constant(name, "copy", c.shape, c.dtype, n.name, t, i)
