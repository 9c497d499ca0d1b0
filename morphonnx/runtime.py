"""Running models in onnxruntime to measure them: sessions, random inputs, timed runs.

``calibrate``, ``profile`` and ``sweep`` measure the same way: one CPU session with the intra-op
threads the user runs inference with, a few warm-up runs (allocations, caches), then the median of
repeated runs, which shrugs off the odd slow run when other processes share the machine
(``calibrate`` takes the fastest run instead: it measures what the hardware can do).
"""

from __future__ import annotations

import statistics
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


def run_latency(
    model: onnx.ModelProto | str | Path,
    config: RunConfig,
    shapes: Mapping[str, Sequence[int]] | None = None,
    fastest: bool = False,
) -> float:
    """Seconds per run of ``model`` with random inputs, measured as ``config`` says: the median of
    the timed runs, or with ``fastest`` the fastest one (what the hardware can do: other processes
    only ever add time)."""
    sess = session(model, config.threads)
    times = time_runs(sess, random_feeds(sess, shapes), config.warmup, config.repeats)
    return min(times) if fastest else statistics.median(times)
