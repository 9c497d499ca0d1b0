"""Proof that a pruned model is the original with its dead channels removed, layer by layer.

The reference is the original model with every member slice of every dead channel set to zero.
Both run in onnxruntime on the same random inputs with every intermediate tensor exposed; each
tensor both compute must agree, on the kept channels where it shrank. Checking only the outputs is
not enough: in a deep untrained network a wrongly sliced group can move the outputs by 1e-6 while
an intermediate tensor is off by half.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from onnx.external_data_helper import load_external_data_for_model

from morphonnx.analysis import Analysis
from morphonnx.ops import op_kind
from morphonnx.prune import replace_constants, sliced_constants, sync_ir3_inputs
from morphonnx.shapevalue import shape_derived

RTOL = 1e-4
"""Allowed deviation relative to the largest magnitude of the tensor (float reassociation only)."""
TINY = 1e-30
"""Slack for exact zeros and denormals (which runtimes may flush); everything else is relative."""


@dataclass
class Verification:
    tensors: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def zeroed_original(a: Analysis, keep: Mapping[str, Sequence[bool]]) -> onnx.ModelProto:
    """The original model with every member slice of every dead channel set to zero."""
    dead = a.solution.dead_labels({k: list(v) for k, v in keep.items()})

    def zero(value: np.ndarray, axis: int, idx: np.ndarray) -> np.ndarray:
        value = value.copy()
        index: list[slice | np.ndarray] = [slice(None)] * value.ndim
        index[axis] = idx
        value[tuple(index)] = 0
        return value

    values = sliced_constants(a, dead, zero)
    model = onnx.load(str(a.graph.path))
    replace_constants(model, a, values)
    sync_ir3_inputs(model)
    return model


def random_feeds(a: Analysis, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in a.graph.inputs:
        info = a.graph.info(name)
        shape = info.shape or ()
        dtype = info.dtype if info.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def run_all(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    folder: Path,
    name: str,
    base_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` with every node output exposed (graph optimizations off, so every tensor is
    the one the graph names). Weights ``model`` still keeps in external data are read from
    ``base_dir`` (the folder of the file it was loaded from)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if base_dir is not None and any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer
    ):
        load_external_data_for_model(m, str(base_dir))
    have = {o.name for o in m.graph.output}
    used = {t for n in m.graph.node for t in n.input}
    for n in m.graph.node:
        for t in n.output:
            if t and t not in have and t in used:
                m.graph.output.append(helper.ValueInfoProto(name=t))
                have.add(t)
    path = folder / f"{name}.onnx"
    size = sum(len(t.raw_data) for t in m.graph.initializer)
    onnx.save_model(
        m, str(path), save_as_external_data=size > 1_800_000_000, location=f"{name}.data"
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, dict(feeds)), strict=True))
    # in graph order, so the first failure of a comparison is where the models start to differ
    order = [t for n in m.graph.node for t in n.output if t in values]
    return {t: values[t] for t in dict.fromkeys(order + names)}


def compare(
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    ref: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    skip: set[str],
) -> Verification:
    sol = a.solution
    dead = sol.dead_labels({k: list(v) for k, v in keep.items()})
    result = Verification()
    for name, r in ref.items():
        if name not in got or name in skip:
            continue
        g = got[name]
        axis = sol.channels.axis_of.get(name)
        if axis is not None and r.shape != g.shape:
            r = np.take(r, sol.kept(sol.channels.by_key[(name, axis)], dead), axis=axis)
        if r.shape != g.shape:
            result.failures.append(f"`{name}`: shape {g.shape}, expected {r.shape}")
            continue
        result.tensors += 1
        if r.dtype.kind != "f":
            if not np.array_equal(r, g):
                result.failures.append(f"`{name}`: values differ")
            continue
        if r.size == 0:
            continue
        odd = ~np.isfinite(r)  # NaN and infinities must match exactly, and not set the scale
        if not np.array_equal(odd, ~np.isfinite(g)) or not np.array_equal(
            r[odd], g[odd], equal_nan=True
        ):
            result.failures.append(f"`{name}`: NaN or infinite values differ")
            continue
        r64, g64 = r[~odd].astype(np.float64), g[~odd].astype(np.float64)
        if r64.size == 0:
            continue
        err = float(np.max(np.abs(r64 - g64)))
        scale = float(np.max(np.abs(r64)))
        rel = err / scale if scale > 0 else err
        if err > result.max_abs:
            result.max_abs = err
        if rel > result.max_rel:
            result.max_rel, result.worst = rel, name
        if err > RTOL * max(scale, _input_scale(a, name, ref)) + TINY:
            result.failures.append(f"`{name}`: off by {err:.3g} (relative {rel:.3g})")
    return result


def _input_scale(a: Analysis, name: str, ref: Mapping[str, np.ndarray]) -> float:
    """The largest magnitude among the computed inputs of a non-expanding op (else 0): its
    outputs may deviate as much as its inputs did. A saturated Sigmoid, whose outputs are all
    near 0, moves in steps of 2**-24 when its input moves by reassociation noise."""
    node = a.graph.producer.get(name)
    if node is None or op_kind(node).expands:
        return 0.0
    scales = [
        float(np.max(np.abs(ref[t][np.isfinite(ref[t])]), initial=0.0))
        for t in node.inputs
        if t in ref and ref[t].dtype.kind == "f"
    ]
    return max(scales, default=0.0)


def verify(
    a: Analysis, keep: Mapping[str, Sequence[bool]], pruned: onnx.ModelProto, seed: int = 0
) -> Verification:
    """Compare ``pruned`` with the zeroed original on random inputs, every tensor."""
    reference = zeroed_original(a, keep)
    feeds = random_feeds(a, seed)
    with tempfile.TemporaryDirectory(prefix="morphonnx-verify-") as tmp:
        folder = Path(tmp)
        ref = run_all(reference, feeds, folder, "reference")
        # a pruned model not saved yet still reads untouched weights from the input's data file
        got = run_all(pruned, feeds, folder, "pruned", base_dir=a.graph.path.absolute().parent)
    return compare(a, keep, ref, got, shape_derived(reference.graph))
