"""Measured time of every node next to the roofline's prediction (``morphonnx profile``).

The model runs in onnxruntime with its profiler on and graph optimizations off, so each node of the
file runs as one kernel under its own name (unnamed nodes get the analysis's names first) and every
node's measured time lines up with its predicted one. Optimizations fuse and drop nodes in a real
deployment, so the measured per-run total here is an upper bound on what ``sweep`` measures.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from morphonnx.analysis import Analysis
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError
from morphonnx.runtime import RunConfig, random_feeds, session, time_runs

_KERNEL = "_kernel_time"


@dataclass
class NodeTime:
    name: str
    op_type: str
    measured: float | None  # median seconds; None: onnxruntime ran no kernel (Constant nodes)
    predicted: float


@dataclass
class OpTypeMiss:
    """Measured and predicted seconds summed over every node of one op type."""

    op_type: str
    nodes: int
    measured: float
    predicted: float

    @property
    def ratio(self) -> float | None:
        """predicted / measured (1 = exact; below 1: the model is too optimistic)."""
        return self.predicted / self.measured if self.measured > 0 else None


@dataclass
class Profile:
    device: Device
    nodes: list[NodeTime]
    run: float  # median seconds of a whole run, as onnxruntime's profiler saw it
    config: RunConfig

    @property
    def measured_total(self) -> float:
        return sum(n.measured or 0.0 for n in self.nodes)

    @property
    def predicted_total(self) -> float:
        return sum(n.predicted for n in self.nodes)

    def by_op_type(self) -> list[OpTypeMiss]:
        """Op types ordered by how much time the model misses on them (largest first)."""
        acc: dict[str, OpTypeMiss] = {}
        for n in self.nodes:
            m = acc.setdefault(n.op_type, OpTypeMiss(n.op_type, 0, 0.0, 0.0))
            m.nodes += 1
            m.measured += n.measured or 0.0
            m.predicted += n.predicted
        return sorted(acc.values(), key=lambda m: abs(m.measured - m.predicted), reverse=True)

    def document(self) -> dict[str, Any]:
        """The ``profile --json`` document."""
        return {
            "format": "morphonnx.profile",
            "version": 1,
            "device": self.device.name,
            "threads": self.config.threads,
            "repeats": self.config.repeats,
            "run_s": self.run,
            "totals": {"measured_s": self.measured_total, "predicted_s": self.predicted_total},
            "nodes": [
                {
                    "name": n.name,
                    "op_type": n.op_type,
                    "measured_s": n.measured,
                    "predicted_s": n.predicted,
                }
                for n in self.nodes
            ],
            "op_types": [
                {
                    "op_type": m.op_type,
                    "nodes": m.nodes,
                    "measured_s": m.measured,
                    "predicted_s": m.predicted,
                    "ratio": m.ratio,
                }
                for m in self.by_op_type()
            ],
        }


def named_model(a: Analysis) -> onnx.ModelProto:
    """The model file with every node named as the analysis names it (profiler events carry node
    names; unnamed nodes would all be reported as one)."""
    try:
        model = onnx.load(str(a.graph.path))
    except Exception as exc:  # onnx raises several types for unreadable files
        msg = " ".join(str(exc).split())[:200]
        raise MorphonnxError(f"{a.graph.path}: cannot load the model to run it ({msg})") from None
    for node in a.graph.nodes:
        model.graph.node[node.index].name = node.name
    return model


def kernel_times(trace: list[dict[str, Any]], skip: int) -> tuple[dict[str, float], float]:
    """Median kernel seconds per node name and median run seconds from onnxruntime's trace,
    leaving out the first ``skip`` (warm-up) runs."""
    per_node: dict[str, list[float]] = {}
    runs: list[float] = []
    for e in trace:
        name = str(e.get("name", ""))
        if e.get("cat") == "Node" and name.endswith(_KERNEL):
            per_node.setdefault(name[: -len(_KERNEL)], []).append(float(e["dur"]) * 1e-6)
        elif e.get("cat") == "Session" and name == "model_run":
            runs.append(float(e["dur"]) * 1e-6)
    runs = runs[skip:]
    medians = {k: statistics.median(v[skip:] or v) for k, v in per_node.items()}
    return medians, statistics.median(runs) if runs else 0.0


def profile(a: Analysis, device: Device, config: RunConfig) -> Profile:
    """Run the model of ``a`` with the profiler; pair each node's measured and predicted time."""
    with tempfile.TemporaryDirectory(prefix="morphonnx-profile-") as tmp:
        sess = session(named_model(a), config.threads, optimize=False, profile_prefix=f"{tmp}/p")
        feeds = random_feeds(sess, {n: a.graph.shape(n) or () for n in a.graph.inputs})
        time_runs(sess, feeds, config.warmup, config.repeats)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    measured, run = kernel_times(trace, config.warmup)
    if not a.totals.complete:
        raise MorphonnxError(
            f"{a.graph.path}: cannot predict every node's time (costs unknown for "
            f"{', '.join(a.totals.unknown[:3])}): profile needs every shape known"
        )
    nodes = [
        NodeTime(c.name, c.op_type, measured.get(c.name), c.latency(device) or 0.0) for c in a.costs
    ]
    return Profile(device, nodes, run, config)
