"""The rewrite from a mask: slice every member, fix what the shapes need, save atomically.

Members are sliced along their axes (a weight may lose filters on axis 0 and inputs on axis 1);
weights held in ``Constant`` / ``ConstantOfShape`` / folded nodes become plain initializers. The
per-op bookkeeping (``group`` of depthwise convs, Reshape targets, Split sizes, Slice bounds, Resize
sizes, Expand shapes) is done by each op's rewrite in the registry (``morphonnx.ops``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_model, load_external_data_for_tensor

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.formats import atomic_write, fingerprint
from morphonnx.load.files import read_model
from morphonnx.load.shapes import SAME_SHAPE_WITHOUT_INFERENCE
from morphonnx.ops import op_kind
from morphonnx.ops.rewrite import RewriteContext
from morphonnx.tensors import all_tensors

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Above this many weight bytes the pruned model is saved with external data (protobuf's 2 GB)."""


def sliced_constants(
    a: Analysis, dead: np.ndarray, transform: Callable[[np.ndarray, int, np.ndarray], np.ndarray]
) -> dict[str, np.ndarray]:
    """New values of every constant with a dead slice: ``transform(value, axis, dead_idx)``."""
    sol = a.solution
    per_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for slot in sol.channels.slots:
        if not slot.const:
            continue
        dead_idx = np.flatnonzero(dead[sol.slot_labels(slot)])
        if len(dead_idx):
            per_tensor.setdefault(slot.tensor, []).append((slot.axis, dead_idx))
    for name in a.graph.materialized_copies(per_tensor):
        per_tensor.setdefault(name, [])  # its source changes: the copy keeps the old values
    result = {}
    for name, cuts in per_tensor.items():
        value = a.graph.value(name)
        for axis, dead_idx in cuts:
            value = transform(value, axis, dead_idx)
        result[name] = value
    return result


def replace_constants(
    model: onnx.ModelProto, a: Analysis, values: Mapping[str, np.ndarray]
) -> None:
    """Write new constant values into ``model``: initializers in place, others as initializers
    replacing the node that made them; a copy of a shared constant is read by its consumer."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = set()
    for name in list(values):
        value = values[name]
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        del value
        c = a.graph.constants.get(name)
        if name in inits:
            inits[name].CopyFrom(tensor)
            continue
        model.graph.initializer.append(tensor)
        if c is not None and c.kind == "copy":
            reader = model.graph.node[a.graph.by_name[c.node or ""].index]
            reader.input[c.input_index] = name
        else:
            producers.add(name)
    if producers:
        keep = [n for n in model.graph.node if not (set(n.output) & producers)]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    drop_unused(model)


def drop_unused(model: onnx.ModelProto) -> None:
    """Remove initializers (and their IR-3 input declarations) that nothing reads any more."""
    g = model.graph
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    for n in g.node:
        for attr in n.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                used.update(_subgraph_names(attr))
    inits = [t for t in g.initializer if t.name in used]
    removed = {t.name for t in g.initializer} - {t.name for t in inits}
    if removed:
        del g.initializer[:]
        g.initializer.extend(inits)
        inputs = [i for i in g.input if i.name not in removed]
        del g.input[:]
        g.input.extend(inputs)


def _subgraph_names(attr: onnx.AttributeProto) -> set[str]:
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    names: set[str] = set()
    for sg in graphs:
        for n in sg.node:
            names.update(n.input)
    return names


def sync_ir3_inputs(model: onnx.ModelProto) -> None:
    """IR 3 lists every initializer as a graph input: keep those declarations in step."""
    if model.ir_version >= 4:
        return
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        t = inits.pop(vi.name, None)
        if t is not None:
            vi.CopyFrom(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for t in inits.values():
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def prune_model(a: Analysis, keep: Mapping[str, Sequence[bool]]) -> onnx.ModelProto:
    """The pruned model, built on a fresh read of the analysed file, so the analysis stays whole
    (verification and cost prediction still read it). Weights stay on disk until the end: the
    sliced ones are read from the mapped file and only the untouched ones are ever copied."""
    model, lazy = read_model(a.graph.path)
    if fingerprint(model) != a.fingerprint:
        raise MorphonnxError(f"{a.graph.path}: the file changed since it was analysed")
    sol = a.solution
    dead = sol.dead_labels({k: list(v) for k, v in keep.items()})
    if not dead.any():
        lazy.restore(model)
        return model
    new_shape = a.shrunk_shapes(keep)
    values = sliced_constants(a, dead, lambda v, axis, idx: np.delete(v, idx, axis=axis))

    def kept(tensor: str) -> np.ndarray | None:
        axis = sol.channels.axis_of.get(tensor)
        if axis is None:
            return None
        return sol.kept(sol.channels.by_key[(tensor, axis)], dead)

    protos = list(model.graph.node)
    for node in a.graph.nodes:
        rewrite = op_kind(node).rewrite
        if rewrite is not None:
            proto = protos[node.index]
            rewrite(RewriteContext(node, proto, model, a.graph, sol.channels, new_shape, kept))
    for node, proto in zip(sorted(a.graph.nodes, key=lambda n: n.index), protos, strict=True):
        if not proto.name:
            proto.name = node.name
    replace_constants(model, a, values)
    # stale shapes of every tensor that lost channels, constants from Constant / folded nodes too
    changed = {s.tensor for s in sol.channels.slots if dead[sol.slot_labels(s)].any()}
    vis = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)
    sync_ir3_inputs(model)
    lazy.restore(model)
    return model


def save_model(
    model: onnx.ModelProto,
    out: str | os.PathLike[str],
    source: Path,
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Save atomically, never over the input; big models get external data beside the output.
    ``check(path)`` runs on the written file before it is moved to ``out``: if it raises, nothing
    is left at ``out`` (nor a data file beside it). Returns the files written."""
    target = Path(out)
    if target.exists() and target.resolve() == source.resolve():
        raise MorphonnxError(f"{target}: refusing to overwrite the input model")
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        load_external_data_for_model(model, str(source.parent))

    data = target.with_name(target.name + ".data")

    def write(tmp: Path) -> None:
        if external:
            data.unlink(missing_ok=True)
            try:
                onnx.save_model(
                    model,
                    str(tmp),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=data.name,
                    size_threshold=1024,
                )
            finally:
                # onnx moves the weights out of the proto into the data file: bring them back, so
                # the caller's model stays whole (verification, a second save elsewhere)
                _internalize(model, data.parent)
        else:
            onnx.save_model(model, str(tmp))
        if check is not None:
            check(tmp)

    try:
        atomic_write(target, write)
    except BaseException:
        if external:
            data.unlink(missing_ok=True)
        raise
    return [target, data] if external else [target]


def _internalize(model: onnx.ModelProto, base_dir: Path) -> None:
    """Undo what saving with external data did to ``model`` in memory: every tensor marked as
    external gets its bytes back (from the proto if still there, else from ``base_dir``)."""
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if t.HasField("raw_data"):  # marked but not written yet (the save failed)
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
        else:
            load_external_data_for_tensor(t, str(base_dir))


def check_pruned(path: Path, shown: str) -> None:
    """``onnx.checker`` with strict shape inference (where every op has a schema)."""
    model = onnx.load(str(path), load_external_data=False)
    full = all(
        n.domain in ("", "ai.onnx") and n.op_type not in SAME_SHAPE_WITHOUT_INFERENCE
        for n in model.graph.node
    )
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise MorphonnxError(
            f"{shown}: pruned model fails onnx.checker ({msg}); nothing written"
        ) from None


def structure(a: Analysis, keep: Mapping[str, Sequence[bool]]) -> dict[str, Any]:
    """The learned structure: input/output channels of every weighted layer, before and after
    (MorphNet's structure exporter, with fully-connected and depthwise layers included)."""
    new_shape = a.shrunk_shapes(keep)
    layers = []
    for node in a.graph.nodes:
        layer = op_kind(node).layer
        if layer is None or len(node.inputs) < 2:
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        w_shape = a.graph.shape(w)
        if not a.graph.is_const(w) or w_shape is None:
            continue
        axis_in = a.solution.channels.axis_of.get(x, 1)
        axis_out = a.solution.channels.axis_of.get(y, 1)
        old_x, old_y = a.graph.shape(x) or (), a.graph.shape(y) or ()
        new_x, new_y = new_shape(x) or (), new_shape(y) or ()
        layers.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "weight": w,
                "depthwise": layer.depthwise(node, w_shape),
                "in_channels": [old_x[axis_in], new_x[axis_in]] if old_x else None,
                "out_channels": [old_y[axis_out], new_y[axis_out]] if old_y else None,
            }
        )
    return {
        "format": "morphonnx.structure",
        "version": 1,
        "model": str(a.graph.path),
        "layers": layers,
    }
