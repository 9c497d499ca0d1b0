"""Proof that a pruned model is the original with its dead channels removed, layer by layer.

The reference is the original model with every member slice of every dead channel set to zero.
Both run in onnxruntime on the same random inputs with every intermediate tensor exposed; each
tensor both compute must agree, on the kept channels where it shrank. Checking only the outputs is
not enough: in a deep untrained network a wrongly sliced group can move the outputs by 1e-6 while
an intermediate tensor is off by half.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.external_data_helper import load_external_data_for_model

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.ops import op_kind
from morphonnx.prune import name_nodes, replace_constants, sliced_constants, sync_ir3_inputs
from morphonnx.shapevalue import shape_derived

RTOL = 1e-4
"""Allowed deviation relative to the largest magnitude of the tensor (float reassociation only)."""
TINY = 1e-30
"""Slack for exact zeros and denormals (which runtimes may flush); everything else is relative."""


class RuntimeFailure(MorphonnxError):
    """onnxruntime could not load or run a model: a verification failure naming the node (and,
    outside verification, a one-line error)."""

    @classmethod
    def of(cls, model: str, exc: Exception) -> RuntimeFailure:
        text = " ".join(str(exc).split())
        found = re.search(r"[Nn]ame:\s*'([^']*)'", text) or re.search(r"Node \(([^)]*)\)", text)
        where = f" at node `{found.group(1)}`" if found else ""
        return cls(f"onnxruntime fails on the {model} model{where}: {text[:300]}")


@dataclass
class Verification:
    tensors: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""
    failures: list[str] = field(default_factory=list)
    deviations: dict[str, float] = field(default_factory=dict)  # allowed ones, by tensor

    @property
    def ok(self) -> bool:
        return not self.failures


def zeroed_original(
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    roles: Mapping[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The original model with every member slice of every dead channel set to zero (with
    ``roles``: only the slices of weights of those roles, each with its own dead labels), except
    divisors (a batch norm's variance, a ``Div``'s per-channel constant), set to one: a dead
    channel is then zero, not the NaN of 0 / 0 that the next layer's zeroed weights would spread
    to every channel (0 * NaN)."""
    dead = a.solution.dead_labels({k: list(v) for k, v in keep.items()})
    divisors = {
        n.inputs[i]
        for n in a.graph.nodes
        for i in op_kind(n).divisors
        if i < len(n.inputs) and a.graph.is_const(n.inputs[i])
    }

    def zero(value: np.ndarray, axis: int, idx: np.ndarray, name: str) -> np.ndarray:
        value = value.copy()
        index: list[slice | np.ndarray] = [slice(None)] * value.ndim
        index[axis] = idx
        value[tuple(index)] = 1 if name in divisors else 0
        return value

    values = sliced_constants(a, dead, zero, roles)
    model = onnx.load(str(a.graph.path))
    name_nodes(model, a)
    replace_constants(model, a, values)
    sync_ir3_inputs(model)
    return model


FEED_LIMIT = 1 << 30
"""Bytes of random inputs verification makes (every intermediate tensor is kept as well)."""


def random_feeds(a: Analysis, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (zeros for other types), made in their own dtype: a float64
    intermediate would double the memory of a large input."""
    infos = [a.graph.info(name) for name in a.graph.inputs]
    size = sum(math.prod(i.shape or ()) * i.itemsize for i in infos)
    if size > FEED_LIMIT:
        raise MorphonnxError(
            f"{a.graph.path}: inputs of {size:,} bytes are too large to verify in memory; give "
            "smaller shapes with --input-shape, or skip verification with --no-verify"
        )
    rng = np.random.default_rng(seed)
    return {i.name: random_input(rng, i.shape or (), i.dtype) for i in infos}


def compare_outputs(
    want: Sequence[np.ndarray], got: Sequence[np.ndarray], rtol: float = RTOL
) -> str | None:
    """What differs between two runs' outputs (a framework model and its sliced copy), or None:
    shapes, NaN and infinities exactly, integers exactly, floats within ``rtol`` of the
    output's largest magnitude."""
    if len(want) != len(got):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        if w.shape != g.shape:
            return f"output {i} has shape {list(g.shape)}, expected {list(w.shape)}"
        if w.dtype.kind != "f" or g.dtype.kind != "f":
            if not np.array_equal(w, g):
                return f"output {i} differs"
            continue
        w64, g64 = w.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(w64)
        if not np.array_equal(finite, np.isfinite(g64)):
            return f"output {i} has NaN or infinite values elsewhere"
        err = float(np.max(np.abs(w64[finite] - g64[finite]), initial=0.0))
        scale = float(np.max(np.abs(w64[finite]), initial=0.0))
        if err > rtol * scale + TINY:
            return f"output {i} is off by {err:.3g} (its largest magnitude: {scale:.3g})"
    return None


def random_input(
    rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype[Any] | None
) -> np.ndarray:
    """Standard normal for floats (float32 when the type is unknown); zeros for integers and
    booleans, which are valid as token ids, positions and masks alike."""
    dtype = dtype if dtype is not None else np.dtype(np.float32)
    if dtype in (np.float32, np.float64):
        return rng.standard_normal(tuple(shape), dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(tuple(shape), dtype=np.float32).astype(dtype)
    return np.zeros(tuple(shape), dtype=dtype)


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
    ort.set_default_logger_severity(3)  # errors come back as exceptions, not log lines
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # its failures come back as RuntimeFailure, not on stderr
    run_opts = ort.RunOptions()
    run_opts.log_severity_level = 4
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        values = dict(zip(names, sess.run(names, dict(feeds), run_opts), strict=True))
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise RuntimeFailure.of(name, exc) from None
    # in graph order, so the first failure of a comparison is where the models start to differ
    order = [t for n in m.graph.node for t in n.output if t in values]
    return {t: values[t] for t in dict.fromkeys(order + names)}


def compare(
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    ref: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    skip: set[str],
    inexact: Collection[str] = (),
) -> Verification:
    """Every tensor both runs compute, on its kept channels; a tensor in ``inexact`` may deviate
    (the deviation is recorded, not a failure)."""
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
        if err <= RTOL * max(scale, _input_scale(a, name, ref)) + TINY:
            continue
        if name in inexact:
            result.deviations[name] = err
        else:
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
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    pruned: onnx.ModelProto,
    seed: int = 0,
    *,
    reference: onnx.ModelProto | None = None,
    inexact: Collection[str] = (),
) -> Verification:
    """Compare ``pruned`` with ``reference`` (default: the zeroed original) on random inputs,
    every tensor; those in ``inexact`` may deviate and are reported."""
    if reference is None:
        reference = zeroed_original(a, keep)
    feeds = random_feeds(a, seed)
    with tempfile.TemporaryDirectory(prefix="morphonnx-verify-") as tmp:
        folder = Path(tmp)
        try:
            ref = run_all(reference, feeds, folder, "reference")
            # a pruned model not saved yet still reads untouched weights from the input's data file
            base = a.graph.path.absolute().parent
            got = run_all(pruned, feeds, folder, "pruned", base_dir=base)
        except RuntimeFailure as exc:
            return Verification(failures=[str(exc)])
    # shape computations inside the model follow the new widths; graph outputs are compared
    # always (build_channels stopped the groups whose removal would change one)
    skip = shape_derived(reference.graph) - {o.name for o in reference.graph.output}
    return compare(a, keep, ref, got, skip, inexact)
