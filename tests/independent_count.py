"""An independent MACs / parameter counter for ONNX graphs.

Used to check morphonnx's own cost model against numbers produced by a
different route, so it deliberately shares nothing with ``morphonnx``:

* it never runs ``onnx.shape_inference`` -- the shape of every intermediate
  tensor is *measured* by running the graph once in onnxruntime (CPU, graph
  optimisations off) with every node output added as a graph output, on random
  inputs;
* shapes of constant tensors come straight from the graph: initializer dims,
  ``Constant`` node values, and the shape value of ``ConstantOfShape`` nodes
  whose shape input is itself constant (so the light model-zoo graphs work
  either raw or after ``light_models.materialize_weights``).

MACs follow the MorphNet convention (one multiply-accumulate per weight use,
bias additions and all other ops free):

* ``Conv``:          ``output.numel() * prod(W.shape[1:])``
* ``ConvTranspose``: ``input.numel() * prod(W.shape[1:])``
* ``Gemm``:          ``M * N * K`` from the shapes of A and B, honouring
  ``transA`` / ``transB``
* ``MatMul``:        ``output.numel() * K`` with ``K = A.shape[-1]``
* everything else:   0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from light_models import attr_int, names_read, random_inputs
from onnx import TensorProto, numpy_helper

__all__ = ["constant_shapes", "count_macs_params", "run_all_tensors"]

_FLOAT_TYPES = {
    getattr(TensorProto, n)
    for n in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "BFLOAT16",
        "FLOAT8E4M3FN",
        "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2",
        "FLOAT8E5M2FNUZ",
        "FLOAT4E2M1",
    )
    if hasattr(TensorProto, n)
}

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------- #
# constants
# --------------------------------------------------------------------------- #
def _constant_node_value(node: onnx.NodeProto) -> tuple[tuple[int, ...], int, np.ndarray | None]:
    """(shape, elem_type, value-or-None) of a ``Constant`` node's output."""
    for a in node.attribute:
        if a.name == "value":
            arr = numpy_helper.to_array(a.t)
            return tuple(a.t.dims), a.t.data_type, arr
        if a.name == "sparse_value":
            return tuple(a.sparse_tensor.dims), a.sparse_tensor.values.data_type, None
        if a.name == "value_float":
            return (), TensorProto.FLOAT, np.asarray(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return (len(a.floats),), TensorProto.FLOAT, np.asarray(a.floats, dtype=np.float32)
        if a.name == "value_int":
            return (), TensorProto.INT64, np.asarray(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return (len(a.ints),), TensorProto.INT64, np.asarray(a.ints, dtype=np.int64)
        if a.name == "value_string":
            return (), TensorProto.STRING, None
        if a.name == "value_strings":
            return (len(a.strings),), TensorProto.STRING, None
    raise ValueError(f"Constant node {node.name!r} has no value attribute")


def constant_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """``name -> (shape, elem_type)`` for every tensor that is constant by
    construction in the top-level graph: initializers, ``Constant`` outputs and
    outputs of ``ConstantOfShape`` nodes whose shape input is one of the former
    (element type taken from the node's ``value`` attribute, default float32)."""
    g = model.graph
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    values: dict[str, np.ndarray] = {}
    for t in g.initializer:
        shapes[t.name] = (tuple(int(d) for d in t.dims), t.data_type)
        if t.data_type in (TensorProto.INT64, TensorProto.INT32):
            values[t.name] = numpy_helper.to_array(t)
    for node in g.node:  # nodes are topologically sorted in a valid model
        if node.op_type == "Constant" and node.output:
            shape, et, arr = _constant_node_value(node)
            shapes[node.output[0]] = (shape, et)
            if arr is not None:
                values[node.output[0]] = arr
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in values:
            shape = tuple(int(d) for d in np.asarray(values[node.input[0]]).reshape(-1))
            et = TensorProto.FLOAT
            for a in node.attribute:
                if a.name == "value":
                    et = a.t.data_type
            shapes[node.output[0]] = (shape, et)
    return shapes


# --------------------------------------------------------------------------- #
# measuring intermediate shapes with onnxruntime
# --------------------------------------------------------------------------- #
def run_all_tensors(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Run ``model`` once in onnxruntime and return every non-constant tensor
    of the top-level graph by name: the fed graph inputs, all node outputs not
    listed by :func:`constant_shapes`, and the graph outputs.

    The extra graph outputs are declared without a type, so no shape inference
    is needed; graph optimisations are disabled so nothing is folded away.
    """
    consts = constant_shapes(model)
    g = model.graph
    wanted: list[str] = [o.name for o in g.output]
    seen = set(wanted)
    for node in g.node:
        for o in node.output:
            if o and o not in consts and o not in seen:
                wanted.append(o)
                seen.add(o)

    m = onnx.ModelProto()  # copy: the caller's model is left untouched
    m.CopyFrom(model)
    extra = [onnx.ValueInfoProto(name=n) for n in wanted[len(g.output) :]]
    m.graph.output.extend(extra)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del m
    if feeds is None:
        feeds = random_inputs(model, seed)
    results = sess.run(wanted, dict(feeds))
    out = {k: np.asarray(v) for k, v in feeds.items()}  # graph inputs have shapes too
    out.update(zip(wanted, results, strict=True))
    return out


# --------------------------------------------------------------------------- #
# counting
# --------------------------------------------------------------------------- #
def _prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _node_keys(graph: onnx.GraphProto) -> list[str | int]:
    """Node name where it is non-empty and unique in the graph, else its index."""
    counts: dict[str, int] = {}
    for n in graph.node:
        counts[n.name] = counts.get(n.name, 0) + 1
    return [n.name if n.name and counts[n.name] == 1 else i for i, n in enumerate(graph.node)]


def count_macs_params(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Count MACs and parameters of ``model`` independently of morphonnx.

    Shapes of intermediate tensors are measured with onnxruntime
    (:func:`run_all_tensors`, random inputs from ``seed`` unless ``feeds`` is
    given; pass ``tensors`` to reuse an earlier run), constant shapes are read
    from the graph (:func:`constant_shapes`).  No onnx shape inference is used.

    Returns a dict with

    ``macs`` (int)
        Sum over nodes of the MorphNet MACs convention (see module docstring):
        Conv ``out.numel()*prod(W.shape[1:])``; ConvTranspose
        ``in.numel()*prod(W.shape[1:])``; Gemm ``M*N*K``; MatMul
        ``out.numel()*A.shape[-1]``; every other op (and every bias) 0.
    ``per_node`` (dict)
        MACs of every node of the top-level graph (0 for most), keyed by the
        node's name where that is non-empty and unique, else by its index in
        ``graph.node``.  Values sum to ``macs``.
    ``macs_by_op`` (dict)
        ``op_type -> MACs`` for the four counted op types present.
    ``params`` (int)
        Total number of elements of all *distinct* floating-point constant
        tensors -- initializers, ``Constant`` node outputs, and outputs of
        ``ConstantOfShape`` nodes whose shape input is constant -- that are
        read as an input by at least one node (top-level, or inside a
        subgraph).  Integer/bool/string constants (shapes, axes, indices) are
        not parameters; a constant that is only a graph output, or not read at
        all, is not counted.  A tensor read by several nodes counts once.
        Initializers that IR<=3 graphs also list as graph inputs are counted.
    ``conv_gemm_params`` (int)
        Elements of the distinct *constant-derived* tensors read by
        Conv/ConvTranspose/Gemm/MatMul nodes (any input position: weights,
        biases, and a constant ``A`` of Gemm/MatMul).  A tensor is
        constant-derived if it is a constant as above, or the output of a node
        all of whose inputs are constant-derived (e.g. a weight passed through
        ``Reshape`` as in Inception v1's classifier); activations never count.
    """
    g = model.graph
    consts = constant_shapes(model)
    if tensors is None:
        tensors = run_all_tensors(model, feeds=feeds, seed=seed)

    def shape_of(name: str) -> tuple[int, ...]:
        if name in consts:
            return consts[name][0]
        if name in tensors:
            return tuple(int(d) for d in np.shape(tensors[name]))
        raise KeyError(f"no shape known for tensor {name!r}")

    keys = _node_keys(g)
    per_node: dict[str | int, int] = {}
    macs_by_op: dict[str, int] = {}
    for key, node in zip(keys, g.node, strict=True):
        op = node.op_type
        macs = 0
        if op == "Conv":
            macs = _prod(shape_of(node.output[0])) * _prod(shape_of(node.input[1])[1:])
        elif op == "ConvTranspose":
            macs = _prod(shape_of(node.input[0])) * _prod(shape_of(node.input[1])[1:])
        elif op == "Gemm":
            a = shape_of(node.input[0])
            b = shape_of(node.input[1])
            m_, k_ = (a[1], a[0]) if attr_int(node, "transA", 0) else (a[0], a[1])
            n_ = b[0] if attr_int(node, "transB", 0) else b[1]
            macs = m_ * n_ * k_
        elif op == "MatMul":
            macs = _prod(shape_of(node.output[0])) * shape_of(node.input[0])[-1]
        per_node[key] = int(macs)
        if op in _MAC_OPS:
            macs_by_op[op] = macs_by_op.get(op, 0) + int(macs)

    # -- params ---------------------------------------------------------------
    read = names_read(g.node)
    params = sum(
        _prod(shape) for name, (shape, et) in consts.items() if et in _FLOAT_TYPES and name in read
    )

    const_derived = set(consts)
    for node in g.node:
        ins = [x for x in node.input if x]
        if ins and all(x in const_derived for x in ins):
            const_derived.update(o for o in node.output if o)
    weight_tensors: set[str] = set()
    for node in g.node:
        if node.op_type in _MAC_OPS:
            weight_tensors.update(x for x in node.input if x and x in const_derived)

    def is_float(name: str) -> bool:
        if name in consts:
            return consts[name][1] in _FLOAT_TYPES
        return bool(np.issubdtype(np.asarray(tensors[name]).dtype, np.floating))

    conv_gemm_params = sum(_prod(shape_of(n)) for n in weight_tensors if is_float(n))

    return {
        "macs": int(sum(per_node.values())),
        "params": int(params),
        "conv_gemm_params": int(conv_gemm_params),
        "per_node": per_node,
        "macs_by_op": macs_by_op,
    }
