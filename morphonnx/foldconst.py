"""Pruning that keeps what the network learned: each dead channel's constant, folded into its
consumers (``prune --fold-constants``).

After MorphNet training a dead channel's regularized parameter (its batch-norm scale, or for a
group without batch norm its producing weights) is ~0, but its shift or bias is not: the channel
still carries a value that does not depend on the input, and the next layers rely on it. Plain
pruning drops that value. Here the *scale-zeroed* model (the original with only the regularized
slices of dead channels set to zero) runs in onnxruntime; wherever dead channels meet a
channel-mixing consumer (Conv, ConvTranspose, Gemm, MatMul) their values are read, and the consumer
op alone is run on them (every other channel zero, bias zero). By linearity that response is
exactly what the pruned consumer loses, so it is added back: to the bias when it is the same at
every position, else (zero padding near borders) as a per-position constant after the consumer.
Onnxruntime computes every op, so no per-op knowledge is repeated here. With dynamic spatial
shapes a per-position constant cannot be stored: the interior value goes into the bias and the
border deviation is reported.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.formats import MASK_FORMAT, read_json
from morphonnx.graph import Node
from morphonnx.ops import op_kind
from morphonnx.prune import drop_unused, sync_ir3_inputs
from morphonnx.verify import random_feeds, run_all, zeroed_original

TOL = 1e-5
"""Relative tolerance for "the same value" (float reassociation only)."""


@dataclass
class Correction:
    """What one consumer must add once the dead channels leave its input (kept outputs only)."""

    node: str
    op_type: str
    weight: str  # the consumer's weight tensor (a spec member: adapters find their layer by it)
    output: str
    axis: int  # channel axis of ``response``
    response: np.ndarray  # at the analysis shape with batch 1, per position
    interior: np.ndarray  # per output channel: the value away from borders
    bias_input: int | None  # which input of the consumer holds its bias, if it may have one
    bias: np.ndarray | None  # the consumer's own bias on its kept outputs

    @property
    def border(self) -> float:
        """How far the response strays from ``interior`` (near zero-padded borders)."""
        return float(np.max(np.abs(self.response - self._per_channel(self.interior)), initial=0))

    @property
    def uniform(self) -> bool:
        scale = float(np.max(np.abs(self.response), initial=0.0))
        return self.border <= TOL * scale

    def _per_channel(self, v: np.ndarray) -> np.ndarray:
        return v.reshape((-1,) + (1,) * (self.response.ndim - 1 - self.axis))


@dataclass
class FoldPlan:
    """Per consumer, its correction; ``static``: spatial shapes are fixed in the model, so a
    per-position correction can be stored and every fold is exact."""

    corrections: list[Correction]
    static: bool

    @property
    def inexact(self) -> list[Correction]:
        return [c for c in self.corrections if not self.static and not c.uniform]


def regularized_dead(
    a: Analysis, keep: Mapping[str, Sequence[bool]], kind: str = "gamma"
) -> dict[str, np.ndarray]:
    """Dead labels per weight role that the scale-zeroed model zeroes: the regularizer's sources
    (``kind`` as in ``morphonnx mask``): gammas of groups with batch norm, else producing
    weights."""
    dead = a.solution.dead_labels({k: list(v) for k, v in keep.items()})
    if kind == "group_lasso":
        return {"producer": dead}
    with_gamma = np.zeros_like(dead)
    for g in a.solution.groups:
        if any(m.role == "gamma" for m in g.members):
            with_gamma[g.labels] = True
    return {"gamma": dead & with_gamma, "producer": dead & ~with_gamma}


def scale_zeroed(
    a: Analysis, keep: Mapping[str, Sequence[bool]], kind: str = "gamma"
) -> onnx.ModelProto:
    """The reference of a folded prune: the original with only the dead channels' regularized
    slices set to zero."""
    return zeroed_original(a, keep, regularized_dead(a, keep, kind))


@dataclass
class _Consumer:
    node: Node
    x: str
    axis: int
    dead_idx: np.ndarray  # dead positions along ``axis`` of ``x``


def _consumers(a: Analysis, dead: np.ndarray) -> list[_Consumer]:
    """Nodes where dead channels stop: their values meet a channel-mixing op there."""
    sol, ch, g = a.solution, a.solution.channels, a.graph
    group_of = {int(lab): grp.id for grp in sol.groups for lab in grp.labels.tolist()}
    found = []
    for node in g.nodes:
        out_labels = {
            int(v)
            for y in node.outputs
            if y in ch.axis_of
            for v in sol.slot_labels(ch.by_key[(y, ch.axis_of[y])]).tolist()
        }
        for x in dict.fromkeys(node.inputs):
            if not x or g.is_const(x) or x not in ch.axis_of:
                continue
            labels = sol.slot_labels(ch.by_key[(x, ch.axis_of[x])])
            dead_here = dead[labels]
            if not dead_here.any():
                continue
            # a conv may mix a channel into others of its own group (a residual stream): every
            # mixer is a consumer; elsewhere a dead channel must carry on to the outputs
            kind = op_kind(node)
            mixer = (
                kind.layer is not None
                and node.inputs[0] == x
                and ch.axis_of[x] == _sides(a, node)[0]
            )
            lost = set(labels[dead_here].tolist()) - out_labels
            if not mixer and (not lost or kind.drops_channels):
                continue
            if not mixer or not all(g.is_const(t) for t in node.inputs[1:] if t):
                gid = group_of.get(int(labels[dead_here][0]), "?")
                raise MorphonnxError(
                    f"{g.path}: --fold-constants: dead channels of group {gid} reach "
                    f"`{node.name}` ({node.op_type}), which is not a Conv, ConvTranspose, Gemm or "
                    "MatMul with constant weights; prune without --fold-constants"
                )
            found.append(_Consumer(node, x, ch.axis_of[x], np.flatnonzero(dead_here)))
    return found


def _responses(a: Analysis, consumers: list[_Consumer], xs: list[np.ndarray]) -> list[np.ndarray]:
    """Each consumer op alone (bias zero) on its input ``xs[i]``, in one onnxruntime session."""
    import onnxruntime as ort

    nodes, inputs, outputs, inits = [], [], [], []
    for i, (c, x) in enumerate(zip(consumers, xs, strict=True)):
        proto = onnx.NodeProto()
        proto.CopyFrom(a.graph.model.graph.node[c.node.index])
        names = [f"x{i}"]
        for j, t in enumerate(c.node.inputs[1:], start=1):
            if not t:
                names.append("")
                continue
            value = a.graph.value(t)
            if j == _bias_input(c.node):
                value = np.zeros_like(value)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(value), f"c{i}_{j}"))
            names.append(f"c{i}_{j}")
        del proto.input[:]
        proto.input.extend(names)
        del proto.output[:]
        proto.output.append(f"y{i}")
        proto.name = f"n{i}"
        nodes.append(proto)
        dtype = helper.np_dtype_to_tensor_dtype(x.dtype)
        inputs.append(helper.make_tensor_value_info(f"x{i}", dtype, list(x.shape)))
        outputs.append(helper.make_tensor_value_info(f"y{i}", dtype, None))
    model = helper.make_model(
        helper.make_graph(nodes, "fold", inputs, outputs, initializer=inits),
        opset_imports=list(a.graph.model.opset_import),
        ir_version=max(a.graph.model.ir_version, 4),
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return list(sess.run(None, {f"x{i}": x for i, x in enumerate(xs)}))


def dynamic_spatial(a: Analysis) -> bool:
    """Whether a graph input leaves a dim other than the batch (axis 0) free."""
    by_name = {vi.name: vi for vi in a.graph.model.graph.input}
    for name in a.graph.inputs:
        t = by_name[name].type.tensor_type
        if t.HasField("shape") and any(not d.HasField("dim_value") for d in t.shape.dim[1:]):
            return True
    return False


def plan_fold(a: Analysis, keep: Mapping[str, Sequence[bool]], kind: str = "gamma") -> FoldPlan:
    """The correction of every consumer of dead channels, from the original model's values."""
    sol = a.solution
    dead = sol.dead_labels({k: list(v) for k, v in keep.items()})
    static = not dynamic_spatial(a)
    consumers = _consumers(a, dead) if dead.any() else []
    if not consumers:
        return FoldPlan([], static)
    reference = scale_zeroed(a, keep, kind)
    with tempfile.TemporaryDirectory(prefix="morphonnx-fold-") as tmp:
        runs = [
            run_all(reference, random_feeds(a, seed), Path(tmp), f"zeroed{seed}") for seed in (0, 1)
        ]
    xs = []
    for c in consumers:
        first, second = (np.take(r[c.x], c.dead_idx, axis=c.axis) for r in runs)
        scale = float(np.max(np.abs(first), initial=0.0))
        if not np.allclose(first, second, rtol=0, atol=TOL * scale + 1e-30):
            raise MorphonnxError(
                f"{a.graph.path}: --fold-constants: dead channels of `{c.x}` (input of "
                f"`{c.node.name}`) still depend on the input once their regularized parameters "
                "are zeroed, so there is no constant to fold; prune without --fold-constants"
            )
        one = slice(None) if c.axis == 0 else slice(0, 1)  # batch 1: broadcasts to any batch
        x = np.zeros_like(runs[0][c.x][one])
        index: list[slice | np.ndarray] = [slice(None)] * x.ndim
        index[c.axis] = c.dead_idx
        x[tuple(index)] = first[one]
        xs.append(x)
    corrections = []
    for c, r in zip(consumers, _responses(a, consumers, xs), strict=True):
        fix = _correction(a, dead, c.node, r)
        if fix.response.any():  # (a depthwise conv's share stays in dead channels)
            corrections.append(fix)
    return FoldPlan(corrections, static)


def _correction(a: Analysis, dead: np.ndarray, node: Node, response: np.ndarray) -> Correction:
    sol, ch = a.solution, a.solution.channels
    y = node.outputs[0]
    axis = ch.axis_of.get(y, _sides(a, node)[1])
    slot = ch.by_key.get((y, axis))
    kept = sol.kept(slot, dead) if slot is not None else np.arange(response.shape[axis])
    response = np.take(response, kept, axis=axis)
    center = tuple(slice(None) if i == axis else d // 2 for i, d in enumerate(response.shape))
    bias = None
    b = _bias_input(node)
    if b is not None and len(node.inputs) > b and node.inputs[b]:
        bias = a.graph.value(node.inputs[b])
        if bias.ndim and bias.shape[-1] == a.graph.shape(y)[axis] > 1:  # type: ignore[index]
            bias = np.take(bias, kept, axis=-1)
    return Correction(
        node.name, node.op_type, node.inputs[1], y, axis, response, response[center], b, bias
    )


def _sides(a: Analysis, node: Node) -> tuple[int, int]:
    """Channel axes of a layer's input 0 and output 0."""
    layer = op_kind(node).layer
    assert layer is not None
    rank = [len(a.graph.shape(t) or ()) for t in (node.inputs[0], node.outputs[0])]
    return layer.sides(node, rank[0], rank[1])


def _bias_input(node: Node) -> int | None:
    layer = op_kind(node).layer
    return layer.bias if layer is not None else None


def apply_fold(model: onnx.ModelProto, plan: FoldPlan) -> None:
    """Add every correction to the pruned ``model`` (in place): into the consumer's bias, or as a
    constant added after it (per position where it varies and shapes are static; after a MatMul,
    which has no bias)."""
    added: dict[str, onnx.NodeProto] = {}
    protos = {n.name: n for n in model.graph.node}
    for c in plan.corrections:
        proto = protos[c.node]
        per_position = plan.static and not c.uniform
        beta = next((a.f for a in proto.attribute if a.name == "beta"), 1.0)
        if not per_position and c.bias_input is not None and beta != 0:
            value = c.interior / beta + (c.bias if c.bias is not None else 0)
            name = _fresh(model, f"{c.node}__folded_bias")
            model.graph.initializer.append(_tensor(value, c.response.dtype, name))
            while len(proto.input) <= c.bias_input:
                proto.input.append("")
            proto.input[c.bias_input] = name
            continue
        value = c.response if per_position else c._per_channel(c.interior)
        name = _fresh(model, f"{c.node}__folded")
        model.graph.initializer.append(_tensor(value, c.response.dtype, name))
        inner = _fresh(model, f"{c.output}__unfolded")
        proto.output[0] = inner
        added[c.node] = helper.make_node(
            "Add", [inner, name], [c.output], name=_fresh(model, f"{c.node}__fold")
        )
    if added:
        nodes = []
        for n in model.graph.node:
            nodes.append(n)
            if n.name in added:
                nodes.append(added[n.name])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    drop_unused(model)
    sync_ir3_inputs(model)


def _tensor(value: np.ndarray, dtype: np.dtype, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name)


def _fresh(model: onnx.ModelProto, base: str) -> str:
    used = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    used.update(t for n in model.graph.node for t in n.output)
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    return name


def inexact_tensors(a: Analysis, plan: FoldPlan) -> set[str]:
    """Tensors downstream of a fold that is exact only away from borders (dynamic shapes)."""
    todo = [c.output for c in plan.inexact]
    found: set[str] = set()
    while todo:
        t = todo.pop()
        if t in found:
            continue
        found.add(t)
        for n in a.graph.consumers.get(t, []):
            todo.extend(o for o in n.outputs if o)
    return found


def mask_kind(path: str | os.PathLike[str]) -> str:
    """Which parameters the mask's regularizer drove to zero (``kind`` of ``morphonnx mask``;
    masks without it are gamma masks)."""
    kind = read_json(path, MASK_FORMAT).get("kind", "gamma")
    if kind not in ("gamma", "group_lasso"):
        raise MorphonnxError(f"{path}: unknown mask kind {kind!r} (gamma or group_lasso)")
    return str(kind)


def read_calibration(path: str | os.PathLike[str], a: Analysis) -> dict[str, np.ndarray]:
    """``--calibration-data``: an ``.npz`` with one array per graph input, keyed by its name."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise MorphonnxError(f"{path}: cannot read calibration data ({exc})") from None
    missing = [n for n in a.graph.inputs if n not in arrays]
    if missing:
        raise MorphonnxError(
            f"{path}: no array for input '{missing[0]}' (has: {', '.join(sorted(arrays)) or '-'})"
        )
    return {n: arrays[n].astype(a.graph.info(n).dtype or np.float32) for n in a.graph.inputs}


def output_deviation(
    original: Path, pruned: Path, feeds: Mapping[str, np.ndarray], shown: str
) -> dict[str, float]:
    """Max absolute difference of each graph output between two models on ``feeds`` (batches
    split to a model's fixed batch size): what the channels below threshold but not zero cost."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    runs = []
    for path in (original, pruned):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        fixed = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
        n = len(next(iter(feeds.values())))
        step = min(fixed) if fixed else n
        if n % step:
            raise MorphonnxError(f"{shown}: {n} samples do not split into batches of {step}")
        try:
            parts = [
                sess.run(None, {k: v[i : i + step] for k, v in feeds.items()})
                for i in range(0, n, step)
            ]
        except Exception as exc:
            msg = " ".join(str(exc).split())[:200]
            raise MorphonnxError(f"{shown}: cannot run the model on these inputs ({msg})") from None
        names = [o.name for o in sess.get_outputs()]
        runs.append({nm: np.concatenate([p[k] for p in parts]) for k, nm in enumerate(names)})
    ref, got = runs
    return {
        name: float(np.max(np.abs(ref[name].astype(np.float64) - got[name]), initial=0.0))
        for name in ref
        if name in got and ref[name].dtype.kind == "f"
    }
