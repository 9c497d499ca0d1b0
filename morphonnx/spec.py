"""The group spec: everything a training adapter needs, without reading the ONNX file.

Per group: members (every constant with a slice per channel), regularization targets (batch-norm
gammas; producing weights with the axis a group-LASSO norm keeps) and, per cost-bearing op, which
groups feed its input and output side and with what coefficients, so MorphNet's FLOP, size and
latency costs and losses can be evaluated from alive counts alone (``morphonnx.regularize``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from morphonnx.analysis import Analysis
from morphonnx.channels import Slot
from morphonnx.costs import node_macs
from morphonnx.errors import MorphonnxError
from morphonnx.formats import SPEC_FORMAT, VERSION, read_json, recorded_attention
from morphonnx.ir import Node
from morphonnx.ops import Layer, op_kind


def _side(a: Analysis, slot: Slot | None, width: int, gid_of: dict[int, str]) -> dict[str, Any]:
    """Which prunable groups make up one side (input or output channels) of an op."""
    if slot is None:
        return {"groups": [], "static": width}
    labels = a.solution.slot_labels(slot)
    counts: dict[str, int] = {}
    static = 0
    for lab in labels.tolist():
        gid = gid_of.get(lab)
        if gid is None:
            static += 1
        else:
            counts[gid] = counts.get(gid, 0) + 1
    groups = []
    for gid, n in counts.items():
        channels = a.solution.group(gid).channels
        groups.append({"group": gid, "per_channel": n // channels})
    return {"groups": groups, "static": static}


def _sides(a: Analysis, node: Node, layer: Layer) -> tuple[str, int, str, int] | None:
    """(input tensor, its channel axis, output tensor, its channel axis) of a cost-bearing op."""
    g = a.graph
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if not g.is_const(w) or g.is_const(x):
        return None
    xs, ys = g.shape(x), g.shape(y)
    if xs is None or ys is None:
        return None
    ax, ay = layer.sides(node, len(xs), len(ys))
    return x, ax, y, ay


def cost_terms(a: Analysis) -> list[dict[str, Any]]:
    """MorphNet cost terms of every weighted layer (Conv, Gemm, MatMul, ...) with a constant weight.

    ``pair`` ops cost ``coeff * A_in * A_out``; ``depthwise`` ops cost ``coeff * A_out``, where
    ``A`` of a side is ``static + sum(per_channel * alive(group))``. Coefficients include the batch.
    """
    gid_of = {int(lab): g.id for g in a.solution.groups if g.prunable for lab in g.labels.tolist()}
    by_key = a.solution.channels.by_key
    terms = []
    for node in a.graph.nodes:
        layer = op_kind(node).layer
        if layer is None:
            continue
        sides = _sides(a, node, layer)
        if sides is None:
            continue
        x, ax, y, ay = sides
        g = a.graph
        cin, cout = (g.shape(x) or ())[ax], (g.shape(y) or ())[ay]
        w_shape = g.shape(node.inputs[1]) or ()
        w_elems = int(np.prod(w_shape))
        depthwise = layer.depthwise(node, w_shape)
        macs = node_macs(node, g.shape)
        if macs is None:
            continue  # shapes unknown: the spec's totals list it among the unknown ops
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
        bias_elems = int(np.prod(g.shape(bias) or ())) if bias and g.is_const(bias) else 0
        x_elems = int(np.prod(g.shape(x) or ()))
        y_elems = int(np.prod(g.shape(y) or ()))
        terms.append(
            {
                "op": node.name,
                "op_type": node.op_type,
                "kind": "depthwise" if depthwise else "pair",
                "inputs": _side(a, by_key.get((x, ax)), cin, gid_of),
                "outputs": _side(a, by_key.get((y, ay)), cout, gid_of),
                "flop_coeff": 2 * macs / (cout if depthwise else cin * cout),
                "size_coeff": w_elems / (cout if depthwise else cin * cout),
                "in_elems": x_elems / cin,
                "out_elems": y_elems / cout,
                "bias_elems": bias_elems / cout,
                "dtype_bytes": g.info(x).itemsize,
            }
        )
    return terms


def _type_name(dtype: np.dtype[Any] | None) -> str | None:
    """numpy's name of an input's element type (``float32``, ``int64``), None when unknown."""
    return None if dtype is None else np.dtype(dtype).name


def build_spec(a: Analysis) -> dict[str, Any]:
    groups = []
    shapes: dict[str, list[int]] = {}
    for g in a.solution.groups:
        members = []
        for m in g.members:
            tensor, axis = a.graph.stored(m.tensor, m.axis)
            shapes[tensor] = list(a.graph.shape(tensor) or ())
            members.append(
                {"tensor": tensor, "axis": axis, "role": m.role, "positions": m.positions}
            )
        groups.append(
            {
                "id": g.id,
                "channels": g.channels,
                "prunable": g.prunable,
                "reason": g.reason,
                "members": members,
                "regularize": {
                    key: [
                        {k: m[k] for k in ("tensor", "axis", "positions")}
                        for m in members
                        if m["role"] == role
                    ]
                    for key, role in (("gammas", "gamma"), ("weights", "producer"))
                },
            }
        )
    return {
        "format": SPEC_FORMAT,
        "version": VERSION,
        "attention": a.attention,
        "model": {
            "fingerprint": a.fingerprint,
            "path": str(a.graph.path),
            "inputs": {n: list(a.graph.shape(n) or ()) for n in a.graph.inputs},
            "input_types": {n: _type_name(a.graph.info(n).dtype) for n in a.graph.inputs},
        },
        "totals": {
            "macs": a.totals.macs,
            "flops": a.totals.flops,
            "params": a.totals.params,
            "complete": a.totals.complete,
            "unknown_ops": a.totals.unknown,
        },
        "tensors": shapes,
        "groups": groups,
        "costs": cost_terms(a),
    }


def read_spec(path: str | os.PathLike[str], fp: str | None = None) -> dict[str, Any]:
    """Read a spec; with ``fp``, refuse one made for another model."""
    spec = read_json(path, SPEC_FORMAT)
    if not isinstance(spec.get("groups"), list) or not isinstance(spec.get("model"), dict):
        raise MorphonnxError(f"{path}: spec needs 'model' and 'groups'")
    recorded_attention(spec, path)
    if fp is not None and spec["model"].get("fingerprint") != fp:
        raise MorphonnxError(
            f"{path}: spec was made for another model (fingerprint "
            f"{spec['model'].get('fingerprint')} != {fp})"
        )
    for i, g in enumerate(spec["groups"]):
        problem = _group_problem(g)
        if problem:
            gid = g.get("id") if isinstance(g, dict) else None
            raise MorphonnxError(f"{path}: group {gid or i} of the spec is malformed ({problem})")
    return spec


def _group_problem(g: Any) -> str | None:
    """What is wrong with one spec group entry (the fields ``mask`` reads), or None."""
    if not isinstance(g, dict):
        return "not an object"
    if not isinstance(g.get("id"), str) or not isinstance(g.get("prunable"), bool):
        return "needs 'id' and 'prunable'"
    if not isinstance(g.get("channels"), int) or g["channels"] < 1:
        return "needs a positive 'channels'"
    reg = g.get("regularize")
    if not isinstance(reg, dict):
        return "needs 'regularize'"
    for key in ("gammas", "weights"):
        entries = reg.get(key)
        if not isinstance(entries, list):
            return f"needs 'regularize.{key}'"
        for e in entries:
            if not (
                isinstance(e, dict)
                and isinstance(e.get("tensor"), str)
                and isinstance(e.get("axis"), int)
                and isinstance(e.get("positions"), list)
                and len(e["positions"]) == g["channels"]
                and all(
                    isinstance(p, list) and p and all(isinstance(i, int) for i in p)
                    for p in e["positions"]
                )
            ):
                return f"bad entry in 'regularize.{key}'"
    return None
