"""Analyze's promise that a group it calls prunable prunes: a dry run of the rewrite on shapes.

``prune`` rewrites attributes and shape vectors (Reshape targets, Split sizes, Slice bounds, ...)
with rules written for the patterns they know; an export nobody foresaw can defeat one. So before a
group is reported prunable, the rewrite ``prune`` would do is run on a weight-free copy of the
model with one channel of every prunable group removed, and ONNX shape inference (with the shape
arithmetic evaluated as at load) must give every tensor exactly the shape the groups predict. When
it does not, the groups are halved until the ones whose rewrite fails are found, and those are
reported unprunable with the reason. Weights are never read: big ones keep only their new dims.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.groups import Group
from morphonnx.load.shapes import SMALL_CONSTANT, infer_tensor_shapes
from morphonnx.prune import dead_slices, kept_channels, replace_constants, rewrite_nodes


def self_check(a: Analysis) -> None:
    """Mark every prunable group whose rewrite fails the dry run unprunable, with the reason."""
    candidates = [g for g in a.solution.groups if g.prunable and g.channels > 1]
    if not candidates:
        return
    for group, problem in _failing(a, candidates, _problem(a, candidates)):
        group.prunable = False
        group.reasons.append(f"the dry run of its rewrite fails: {problem}")


def _failing(a: Analysis, groups: Sequence[Group], problem: str | None) -> list[tuple[Group, str]]:
    """The groups whose rewrite fails on its own (halving); all of them when only their
    combination fails."""
    if problem is None:
        return []
    if len(groups) == 1:
        return [(groups[0], problem)]
    half = len(groups) // 2
    found = []
    for part in (groups[:half], groups[half:]):
        found += _failing(a, part, _problem(a, part))
    return found or [(g, problem) for g in groups]


def _problem(a: Analysis, groups: Sequence[Group]) -> str | None:
    """What goes wrong when one channel of each of ``groups`` is removed (None: nothing)."""
    keep = {g.id: [i != 0 for i in range(g.channels)] for g in groups}
    dead = a.solution.dead_labels(keep)
    expected = a.shrunk_shapes(keep)
    model = onnx.ModelProto()
    model.CopyFrom(a.graph.model)  # weights are not in it (the loader left them on disk)
    try:
        rewrite_nodes(a, model, expected, kept_channels(a, dead))
        replaced = _slice_constants(a, model, dead)
    except Exception as exc:  # a rewrite that cannot handle this graph: prune would fail too
        return f"the rewrite raises {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    _sort_nodes(model)
    g = a.graph
    fixed = {name: list(g.shape(name) or ()) for name in g.inputs}
    constants = {k: c for k, c in g.constants.items() if k not in replaced}
    try:
        tensors = infer_tensor_shapes(g.path, model, fixed, constants)
    except MorphonnxError as exc:
        return str(exc).split(": ", 1)[-1]
    for node in g.nodes:
        for t in node.outputs:
            info = g.tensors.get(t)
            if not t or g.is_const(t) or info is None or not info.known:
                continue
            got = tensors.get(t)
            want = expected(t)
            if got is None or got.shape != want:
                shown = "unknown" if got is None or not got.known else list(got.shape or ())
                return (
                    f"`{t}` (output of {node.op_type} at node `{node.name}`) gets shape {shown} "
                    f"instead of {list(want or ())}"
                )
    return None


def _slice_constants(a: Analysis, model: onnx.ModelProto, dead: np.ndarray) -> set[str]:
    """Constants take their pruned shapes, as ``prune`` writes them: big initializers only their
    dims (shape inference declares them as typed inputs), float ones zeros (shape inference
    needs no weight values), integer ones their sliced values. Returns the constants written
    as new initializers (their Constant / folded nodes are gone)."""
    inits = {t.name: t for t in model.graph.initializer}
    values = {}
    for name, cuts in dead_slices(a, dead).items():
        info = a.graph.info(name)
        shape = list(info.shape or ())
        for axis, idx in cuts:
            shape[axis] -= len(idx)
        init = inits.get(name)
        if init is not None and math.prod(shape) > SMALL_CONSTANT:
            stub = onnx.TensorProto(name=name, data_type=init.data_type, dims=shape)
            init.CopyFrom(stub)
        elif info.dtype is not None and info.dtype.kind == "f":
            values[name] = np.zeros(shape, dtype=info.dtype)
        else:
            value = a.graph.value(name)
            for axis, idx in cuts:
                value = np.delete(value, idx, axis=axis)
            values[name] = value
    replace_constants(model, a, values)
    return {name for name in values if name not in inits}


def _sort_nodes(model: onnx.ModelProto) -> None:
    """Topological order (files may list nodes out of order; shape inference needs the order).
    Nodes in a cycle stay last, for shape inference to report."""
    base = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input} | {""}
    done = set(base)
    waiting = list(model.graph.node)
    order: list[onnx.NodeProto] = []
    while waiting:
        rest = []
        for n in waiting:
            if all(t in done for t in n.input):
                done.update(n.output)
                order.append(n)
            else:
                rest.append(n)
        if not rest and len(order) == len(waiting) == len(model.graph.node):
            return  # one pass took every node in file order: already sorted (the common case)
        if len(rest) == len(waiting):
            order += rest
            break
        waiting = rest
    del model.graph.node[:]
    model.graph.node.extend(order)
