"""Safe loading of untrusted ONNX files into a :class:`~morphonnx.graph.Graph`.

Three concerns live here and nowhere else:
- the file is untrusted: parse errors become one-line errors, external-data locations may not leave
  the model's folder, and weights are read lazily (analyze never needs their values);
- symbolic input dims are resolved from ``--batch`` / ``--input-shape`` before shape inference,
  and a dim left unknown is an error that names it;
- shape inference runs on a copy of the graph *without* its big weights (they become typed graph
  inputs), because ``onnx.shape_inference`` serializes the whole model, weights included.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from morphonnx.errors import MorphonnxError
from morphonnx.fold import FOLDS
from morphonnx.graph import (
    Constant,
    Graph,
    Node,
    Shape,
    TensorInfo,
    attribute_values,
    constant_node_value,
    subgraph_outer_inputs,
)
from morphonnx.ops import op_kind
from morphonnx.protoscan import LazyWeights, read_stripped

SMALL_CONSTANT = 1024
"""Constants up to this many elements stay in the shape-inference copy (shape vectors, axes)."""


def load_graph(
    path: str | os.PathLike[str],
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Graph:
    """Load ``path`` with every tensor shape known, or raise a one-line :class:`MorphonnxError`."""
    try:
        return _load_graph(Path(path), batch, input_shapes or {})
    except MorphonnxError as err:
        flat = _one_line(str(err))
        if flat != str(err):
            raise MorphonnxError(flat) from None
        raise


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
"""Characters ``str.splitlines`` breaks on."""


def _one_line(text: str) -> str:
    """``text`` with line breaks escaped, so names and paths from the file cannot split it."""
    return "".join(c.encode("unicode_escape").decode() if c in _LINE_BREAKS else c for c in text)


def _load_graph(p: Path, batch: int, input_shapes: Mapping[str, Sequence[int]]) -> Graph:
    model, lazy = read_model(p)
    check_external_data(model, p)
    opset = default_opset(model)
    defined = {t.name for t in model.graph.initializer}
    defined.update(o for n in model.graph.node for o in n.output)
    real_inputs = [i for i in model.graph.input if i.name not in defined]
    fixed = resolve_input_shapes(p, real_inputs, batch, input_shapes)
    batch_used = any(
        (dims := _dims(i)) and not (isinstance(dims[0], int) and dims[0] > 0)
        for i in real_inputs
        if i.name not in input_shapes
    )
    nodes = make_nodes(model)
    check_references(p, model, nodes)
    constants = find_constants(model, nodes, p, lazy)
    tensors = infer_tensor_shapes(p, model, fixed, constants, [n.index for n in nodes])
    fold_constants(nodes, constants, tensors)
    unshare_per_channel_constants(nodes, constants)
    return Graph(
        model=model,
        path=p,
        nodes=nodes,
        tensors=tensors,
        constants=constants,
        inputs=[i.name for i in real_inputs],
        outputs=[o.name for o in model.graph.output],
        opset=opset,
        lazy=lazy,
        batch_used=batch_used,
    )


def read_model(p: Path) -> tuple[onnx.ModelProto, LazyWeights]:
    """Parse the graph; big weights stay on disk until a command needs their values."""
    if not p.exists():
        raise MorphonnxError(f"{p}: file not found")
    if not p.is_file():
        raise MorphonnxError(f"{p}: not a file")
    try:
        model, lazy = read_stripped(p)
    except OSError as exc:
        raise MorphonnxError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # protobuf raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MorphonnxError(f"{p}: not a valid ONNX model ({first})") from None
    if not model.HasField("graph") or not model.graph.output:
        raise MorphonnxError(f"{p}: not a valid ONNX model (no graph outputs; truncated file?)")
    if not model.opset_import:
        raise MorphonnxError(f"{p}: not a valid ONNX model (no opset_import; truncated file?)")
    return model, lazy


def _tensor_protos(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    found = list(model.graph.initializer)
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                found.append(a.t)
    return found


_PACKED_OR_VARIABLE = frozenset(
    getattr(onnx.TensorProto, n, -1)
    for n in ("UNDEFINED", "STRING", "INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
)
"""Element types whose stored size is not ``numel * itemsize``."""


def check_external_data(model: onnx.ModelProto, p: Path) -> None:
    """Refuse external-data locations that escape the model's folder (absolute, ``..``, links).

    The folder is the one holding ``p`` as given (not a symlink's target): that is where
    ``onnx`` and :meth:`Graph.value` look for the data.
    """
    base = p.absolute().parent.resolve()
    for t in _tensor_protos(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        where = f"{p}: external data of tensor '{t.name}' at '{loc}'"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise MorphonnxError(f"{where} points outside the model's folder")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise MorphonnxError(f"{where} points outside the model's folder")
        if not target.is_file():
            raise MorphonnxError(f"{where} is missing")
        try:
            offset, length = (int(entries.get(k) or 0) for k in ("offset", "length"))
        except ValueError:
            offset = length = -1
        if offset < 0 or length < 0:
            raise MorphonnxError(f"{where} has an invalid offset or length")
        dtype = _np_dtype(t.data_type)
        if not length and dtype is not None and t.data_type not in _PACKED_OR_VARIABLE:
            length = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        if offset + length > target.stat().st_size:
            raise MorphonnxError(f"{where} is shorter than the tensor (truncated file?)")


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return onnx.defs.onnx_opset_version()


def _dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def resolve_input_shapes(
    p: Path,
    inputs: Sequence[onnx.ValueInfoProto],
    batch: int,
    given: Mapping[str, Sequence[int]],
) -> dict[str, list[int]]:
    """Concrete shapes of the graph inputs: given ones, else declared ones with batch filled in."""
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise MorphonnxError(f"{p}: --input-shape names '{name}', not an input of the model")
    if batch < 1:
        raise MorphonnxError(f"{p}: --batch must be at least 1")
    fixed: dict[str, list[int]] = {}
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in given:
            try:
                shape = [operator.index(d) for d in given[vi.name]]
            except TypeError:
                raise MorphonnxError(
                    f"{p}: --input-shape for '{vi.name}' must be integers"
                ) from None
            if dims is not None and len(dims) != len(shape):
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has rank {len(dims)}, --input-shape gives {len(shape)}"
                )
            if any(d < 1 for d in shape):
                raise MorphonnxError(f"{p}: --input-shape for '{vi.name}' must be positive dims")
            fixed[vi.name] = shape
            continue
        if dims is None:
            if vi.type.HasField("tensor_type"):
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has no declared shape; pass --input-shape "
                    f"{vi.name}=D0,D1,..."
                )
            continue
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(batch)
            else:
                hint = ",".join(
                    str(v) if isinstance(v, int) and v > 0 else str(batch) if a == 0 else f"D{a}"
                    for a, v in enumerate(dims)
                )
                raise MorphonnxError(
                    f"{p}: input '{vi.name}' has dynamic dim '{d}' at axis {axis}; pass "
                    f"--input-shape {vi.name}={hint} with a size for each D"
                )
        fixed[vi.name] = shape
    return fixed


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
        nodes.append(
            Node(
                index=i,
                name=name,
                op_type=proto.op_type,
                domain=proto.domain,
                inputs=list(proto.input),
                outputs=list(proto.output),
                attrs=attribute_values(proto),
                implicit_inputs=subgraph_outer_inputs(proto),
            )
        )
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
        dtype = _check_tensor(path, t, stored)
        constants[t.name] = Constant(t.name, "initializer", tuple(t.dims), dtype)
    small_ints = {t.name: t for t in model.graph.initializer if int(np.prod(t.dims)) <= 64}
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
            src = n.inputs[0]
            shape_value: np.ndarray | None = None
            if src in small_ints:
                shape_value = numpy_helper.to_array(small_ints[src])
            elif src in constants and constants[src].kind == "constant_node":
                shape_value = constant_node_value(
                    next(m for m in nodes if m.name == constants[src].node)
                )
            if shape_value is None:
                continue
            fill = n.attr("value")
            fill_dtype = _np_dtype(fill.data_type) if fill is not None else np.dtype(np.float32)
            shape = tuple(int(d) for d in np.asarray(shape_value).reshape(-1))
            if fill_dtype is None or any(d < 0 for d in shape):
                continue  # not a well-formed constant; shape inference decides what it is
            constants[out] = Constant(out, "constant_of_shape", shape, fill_dtype, node=n.name)
    return constants


def _np_dtype(code: int) -> np.dtype | None:
    """The numpy dtype of an ONNX element type, or None for an unknown code."""
    if code == onnx.TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(code))
    except (KeyError, TypeError, ValueError):
        return None


def _check_tensor(path: Path | None, t: onnx.TensorProto, stored: int) -> np.dtype:
    """The dtype of initializer ``t``, after checking its type, dims and inline byte count."""
    dtype = _np_dtype(t.data_type)
    if dtype is None:
        raise MorphonnxError(f"{path}: initializer '{t.name}' has unknown data type {t.data_type}")
    if any(d < 0 for d in t.dims):
        raise MorphonnxError(f"{path}: initializer '{t.name}' has negative dims {list(t.dims)}")
    if stored and t.data_type not in _PACKED_OR_VARIABLE:
        need = int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
        if stored != need:
            raise MorphonnxError(
                f"{path}: initializer '{t.name}' holds {stored} bytes, its shape "
                f"{list(t.dims)} needs {need} (corrupt file?)"
            )
    return dtype


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
    known: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in g.initializer if math.prod(t.dims) <= 64
    }
    produced: set[str] = set()
    for proto in g.node:
        node = Node(
            0,
            proto.name,
            proto.op_type,
            proto.domain,
            list(proto.input),
            list(proto.output),
            attribute_values(proto),
        )
        produced.update(proto.output)
        value: np.ndarray | None = None
        try:
            if node.op_type == "Constant" and node.standard:
                value = constant_node_value(node)
            elif node.op_type == "Shape" and node.standard:
                info = tensors.get(node.inputs[0])
                if info is not None and info.known and info.shape is not None:
                    start, end = node.attr("start", 0), node.attr("end", None)
                    value = np.array(info.shape, dtype=np.int64)[start:end]
            elif node.op_type == "ConstantOfShape" and node.standard:
                size = known.get(node.inputs[0])
                fill = node.attr("value")
                if size is not None and size.size <= 1 and int(size.reshape(-1)[0]) <= 64:
                    fv = numpy_helper.to_array(fill).reshape(-1) if fill is not None else None
                    if fv is not None:
                        value = np.full(size.reshape(-1).tolist(), fv[0], dtype=fv.dtype)
            elif node.standard and node.op_type in FOLDS and node.inputs:
                if all(t == "" or t in known for t in node.inputs):
                    value = FOLDS[node.op_type](node, [known.get(t) for t in node.inputs])
        except Exception:  # anything unusual: leave it to shape inference
            value = None
        if value is not None and value.dtype.kind in "iubf" and value.size <= 64:
            known[node.outputs[0]] = value
    pinned: set[str] = set()
    for proto in g.node:
        for i, t in enumerate(proto.input):
            v = known.get(t)
            if t not in produced or v is None or v.dtype.kind not in "iuf":
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
    dtype = _np_dtype(t.elem_type) if t.elem_type else None
    shape: Shape | None = None
    if t.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else -1 for d in t.shape.dim
        )
    return TensorInfo(vi.name, shape, dtype)
