"""Running models in onnxruntime to measure them: sessions, random inputs, timed runs.

``calibrate``, ``profile`` and ``sweep`` measure the same way: one CPU session with the intra-op
threads the user runs inference with, a few warm-up runs (allocations, caches), then repeated runs:
``calibrate`` keeps the fastest (what the hardware can do), ``profile`` and ``sweep`` the median,
which shrugs off the odd slow run when other processes share the machine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from morphonnx.errors import MorphonnxError

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class RunConfig:
    """How models are run when measured: threads (0 = onnxruntime's default), warm-up, repeats."""

    threads: int = 0
    warmup: int = 3
    repeats: int = 20


def session(
    model: onnx.ModelProto | str | Path,
    threads: int = 0,
    *,
    optimize: bool = True,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """A CPU session. ``optimize=False`` keeps the graph as written (one kernel per node, for the
    per-node profiler); ``profile_prefix`` turns onnxruntime's profiler on."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        shown = "model" if isinstance(model, onnx.ModelProto) else str(model)
        msg = " ".join(str(exc).split())[:300]
        raise MorphonnxError(f"{shown}: onnxruntime cannot load it ({msg})") from None


def random_feeds(
    sess: ort.InferenceSession,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs for every session input, at ``shapes`` where given (the analysis's shapes:
    ``--batch``, ``--input-shape``); other dynamic dims become 1."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        dtype = _ORT_TYPES.get(i.type)
        if dtype is None:
            raise MorphonnxError(f"input {i.name}: cannot make inputs of type {i.type}")
        given = (shapes or {}).get(i.name)
        shape = (
            list(given) if given else [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        )
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[i.name] = np.zeros(shape, dtype=dtype)
    return feeds


def time_runs(
    sess: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int, repeats: int
) -> list[float]:
    """Seconds of each of ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return times


def time_pairs(
    a: tuple[ort.InferenceSession, dict[str, np.ndarray]],
    b: tuple[ort.InferenceSession, dict[str, np.ndarray]],
    warmup: int,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` runs of session ``a`` and of ``b``, alternating run by run, so a
    change in the machine's load hits both alike (their ratio is what stays meaningful)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for (sess, feeds), out in zip((a, b), times, strict=True):
            start = time.perf_counter()
            sess.run(None, feeds)
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return times
