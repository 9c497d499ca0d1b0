"""The rewrite from a mask: slice every member, fix what the shapes need, save atomically.

Members are sliced along their axes (a weight may lose filters on axis 0 and inputs on axis 1);
weights held in ``Constant`` / ``ConstantOfShape`` / folded nodes become plain initializers. The
per-op bookkeeping (``group`` of depthwise convs, Reshape targets, Split sizes, Slice bounds, Resize
sizes, Expand shapes) is done by each op's rewrite in the registry (``morphonnx.ops``).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import (
    load_external_data_for_model,
    load_external_data_for_tensor,
    set_external_data,
)

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.formats import atomic_write, check_output, fingerprint
from morphonnx.load.files import read_model
from morphonnx.load.shapes import SAME_SHAPE_WITHOUT_INFERENCE
from morphonnx.ops import ShapeOf, op_kind
from morphonnx.ops.rewrite import RewriteContext
from morphonnx.protoscan import read_stripped
from morphonnx.tensors import all_tensors

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Above this many weight bytes the pruned model is saved with external data (protobuf's 2 GB)."""


def dead_slices(
    a: Analysis, dead: np.ndarray, roles: Mapping[str, np.ndarray] | None = None
) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every constant that changes: its (axis, dead indices) cuts (none for a copy that keeps
    the old values of a source that changes). With ``roles``, only the weights of those roles,
    each with its own dead labels."""
    sol = a.solution
    per_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for slot in sol.channels.slots:
        if not slot.const or (roles is not None and slot.role not in roles):
            continue
        dead_of = dead if roles is None else roles[slot.role]
        dead_idx = np.flatnonzero(dead_of[sol.slot_labels(slot)])
        if len(dead_idx):
            per_tensor.setdefault(slot.tensor, []).append((slot.axis, dead_idx))
    for name in a.graph.materialized_copies(per_tensor):
        per_tensor.setdefault(name, [])  # its source changes: the copy keeps the old values
    return per_tensor


def sliced_constants(
    a: Analysis,
    dead: np.ndarray,
    transform: Callable[[np.ndarray, int, np.ndarray, str], np.ndarray],
    roles: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """New values of every constant with a dead slice: ``transform(value, axis, dead_idx,
    name)``; constants computed from one that changes keep their old values. With ``roles``,
    only the weights of those roles, each with its own dead labels."""
    result = {}
    for name, cuts in dead_slices(a, dead, roles).items():
        value = a.graph.value(name)
        for axis, dead_idx in cuts:
            value = transform(value, axis, dead_idx, name)
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


def name_nodes(model: onnx.ModelProto, a: Analysis) -> None:
    """Every node gets the unique name the analysis knows it by (unnamed nodes and repeated
    names are legal in files onnxruntime refuses to load). Call before nodes are removed."""
    by_index = sorted(a.graph.nodes, key=lambda n: n.index)
    for node, proto in zip(by_index, model.graph.node, strict=True):
        proto.name = node.name


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


def kept_channels(a: Analysis, dead: np.ndarray) -> Callable[[str], np.ndarray | None]:
    """Surviving indices along a tensor's channel axis when the classes ``dead`` die."""
    sol = a.solution

    def kept(tensor: str) -> np.ndarray | None:
        axis = sol.channels.axis_of.get(tensor)
        if axis is None:
            return None
        return sol.kept(sol.channels.by_key[(tensor, axis)], dead)

    return kept


def rewrite_nodes(
    a: Analysis,
    model: onnx.ModelProto,
    new_shape: ShapeOf,
    kept: Callable[[str], np.ndarray | None],
) -> None:
    """Run every node's rewrite on ``model``: a fresh read of the analysed file, or a weight-free
    copy with the same nodes in the same order (``selfcheck``). Nodes get the names the analysis
    knows them by; nodes a rewrite adds go right before the node that needs them.
    ``kept``: surviving indices along a tensor's channel axis (:func:`kept_channels`)."""
    protos = list(model.graph.node)
    inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    for node in a.graph.nodes:
        rewrite = op_kind(node).rewrite
        if rewrite is not None:
            proto = protos[node.index]
            ctx = RewriteContext(node, proto, model, a.graph, a.solution.channels, new_shape, kept)
            rewrite(ctx)
            inserted += [(new, proto) for new in ctx.inserted]
    name_nodes(model, a)
    if inserted:
        before: dict[int, list[onnx.NodeProto]] = {}
        for new, at in inserted:
            before.setdefault(id(at), []).append(new)
        order = [n for p in protos for n in [*before.get(id(p), []), p]]
        del model.graph.node[:]
        model.graph.node.extend(order)


def prune_model(a: Analysis, keep: Mapping[str, Sequence[bool]]) -> onnx.ModelProto:
    """The pruned model, built on a fresh read of the analysed file, so the analysis stays whole
    (verification and cost prediction still read it). Weights stay on disk until the end: the
    sliced ones are read from the mapped file and only the untouched ones are ever copied."""
    sol = a.solution
    dead = sol.dead_labels({k: list(v) for k, v in keep.items()})
    values = sliced_constants(a, dead, lambda v, axis, idx, _: np.delete(v, idx, axis=axis))
    changed = {s.tensor for s in sol.channels.slots if dead[sol.slot_labels(s)].any()}
    kept = kept_channels(a, dead)
    return rewrite_model(a, a.shrunk_shapes(keep), values, kept, changed)


def rewrite_model(
    a: Analysis,
    new_shape: ShapeOf,
    values: Mapping[str, np.ndarray],
    kept: Callable[[str], np.ndarray | None],
    changed: set[str],
) -> onnx.ModelProto:
    """A fresh read of the analysed file with the shapes ``new_shape``: new constant ``values``,
    each op's bookkeeping rewritten (``kept``: surviving indices along a tensor's channel axis),
    stale shapes of the ``changed`` tensors dropped. Shared by ``prune`` and ``expand``."""
    model, lazy = read_model(a.graph.path)
    if fingerprint(model) != a.fingerprint:
        raise MorphonnxError(f"{a.graph.path}: the file changed since it was analysed")
    if not changed:
        name_nodes(model, a)
        lazy.restore(model)
        return model
    rewrite_nodes(a, model, new_shape, kept)
    replace_constants(model, a, values)
    # stale shapes of every tensor that changed, constants from Constant / folded nodes too
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
    is left at ``out`` (nor a data file beside it). Returns the files written.

    External data goes to a file created afresh for this write (``OUT.data``, or
    ``OUT.<random>.data`` when that name is taken), so an earlier output and its data file stay a
    valid pair until the new ``.onnx`` replaces the old one in one rename; only then is the old
    output's data file removed, unless the input model reads it. No data file is ever written
    over, and two commands writing the same output cannot disturb each other's files."""
    target = check_output(out)
    if target.exists() and _same_file(target, source):
        raise MorphonnxError(f"{target}: refusing to overwrite the input model")
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        load_external_data_for_model(model, str(source.parent))
    data = _fresh_data_file(target) if external else None
    replaced: list[Path] = []

    def write(tmp: Path) -> None:
        if data is not None:
            try:
                _move_weights_out(model, data)
                onnx.save_model(model, str(tmp))
            finally:
                # the weights left the proto for the data file: bring them back, so the
                # caller's model stays whole (verification, a second save elsewhere)
                _internalize(model, data.parent)
        else:
            onnx.save_model(model, str(tmp))
        if check is not None:
            check(tmp)
        # read last: the pair this write replaces; only data files named as this function names
        # them are ours to remove (an old output may name any file in the folder)
        ours = re.compile(re.escape(target.name) + r"(\.[0-9a-f]{8})?\.data")
        replaced.extend(f for f in external_files(target) if ours.fullmatch(f.name))

    try:
        atomic_write(target, write)
    except BaseException:
        if data is not None:
            data.unlink(missing_ok=True)
        raise
    if data is not None and not data.stat().st_size:  # every weight was small: none moved
        data.unlink()
        data = None
    needed = external_files(source) + ([data] if data is not None else [])
    for old in replaced:
        if not any(_same_file(old, n) for n in needed):
            old.unlink(missing_ok=True)
    return [target, data] if data is not None else [target]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _move_weights_out(model: onnx.ModelProto, data: Path, threshold: int = 1024) -> None:
    """Append every initializer of ``threshold`` bytes or more to ``data`` and point it there
    (``onnx.save_model`` would refuse a data file that already exists, even the empty one
    :func:`_fresh_data_file` reserved, and checks that name in the working folder)."""
    with open(data, "r+b") as f:
        f.seek(0, os.SEEK_END)
        for t in model.graph.initializer:
            if t.HasField("raw_data") and len(t.raw_data) >= threshold:
                offset = f.tell()
                f.write(t.raw_data)
                set_external_data(t, data.name, offset, len(t.raw_data))
                t.ClearField("raw_data")
        f.flush()
        os.fsync(f.fileno())


def _fresh_data_file(target: Path) -> Path:
    """A new, empty external-data file beside ``target`` that no other file refers to yet."""
    name = f"{target.name}.data"
    while True:
        path = target.with_name(name)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            name = f"{target.name}.{secrets.token_hex(4)}.data"  # (the pattern save_model removes)
        except OSError as exc:
            raise MorphonnxError(f"{path}: cannot write ({exc.strerror or exc})") from None


def external_files(path: Path) -> list[Path]:
    """The regular files beside ``path`` that the model there keeps external data in (none if
    it is missing or unreadable); read without loading any weights."""
    if not path.is_file():
        return []
    try:
        model, _ = read_stripped(path)
    except Exception:  # not a model we can read: it refers to nothing we would touch
        return []
    found: dict[str, Path] = {}
    for t in all_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if loc and Path(loc).name == loc and loc not in (".", ".."):
            candidate = path.with_name(loc)
            if candidate.is_file() and not candidate.is_symlink():
                found[loc] = candidate
    return list(found.values())


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
    return {
        "format": "morphonnx.structure",
        "version": 1,
        "model": str(a.graph.path),
        "layers": layer_widths(a, a.shrunk_shapes(keep)),
    }


def layer_widths(a: Analysis, new_shape: ShapeOf) -> list[dict[str, Any]]:
    """Input/output channels of every weighted layer, now and at the shapes ``new_shape``."""
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
    return layers
