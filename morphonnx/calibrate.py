"""Measure this machine in onnxruntime and turn the numbers into a device profile.

Each number comes from a one-op model timed the way inference runs (same threads, warm-up; the
fastest of the repeats, since other processes on the machine only ever add time): attainable FLOP/s
of a dense 3x3 conv, a depthwise 3x3 conv and a MatMul, memory bandwidth from a large elementwise
Add, and a fixed cost per op from a chain of tiny Adds. A run also pays a fixed cost for the call
itself; the time of a one-tiny-op model is subtracted from every measurement, so only the op's own
time is divided into its FLOPs or bytes.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from morphonnx.devices import Device
from morphonnx.runtime import RunConfig, fastest_run

_F = TensorProto.FLOAT


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of the one-op models: the full set, or a small one for quick checks."""

    conv_channels: int
    conv_hw: int
    dw_channels: int
    dw_hw: int
    matmul: tuple[int, int, int]  # M, K, N
    add_elements: int
    chain: int


FULL = Sizes(96, 56, 192, 56, (256, 512, 512), 1 << 21, 64)
QUICK = Sizes(32, 28, 64, 28, (64, 256, 256), 1 << 18, 32)


@dataclass(frozen=True)
class Measurement:
    """One timed one-op model: what it computes and moves, and its time less the call's own."""

    what: str
    flops: float
    nbytes: float
    seconds: float

    @property
    def rate(self) -> float:
        """FLOP/s for compute measurements, bytes/s for the bandwidth one."""
        return (self.flops or self.nbytes) / self.seconds


@dataclass(frozen=True)
class Calibration:
    device: Device
    measurements: list[Measurement]
    call_overhead: float  # seconds a run of a one-tiny-op model takes (not per op)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int]]],
    out: str,
    inits: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "calibrate",
        [helper.make_tensor_value_info(n, _F, s) for n, s in inputs],
        [helper.make_tensor_value_info(out, _F, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _const(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)


def conv_model(channels: int, hw: int, depthwise: bool) -> onnx.ModelProto:
    """A 3x3 'same' conv, dense (channels -> channels) or depthwise."""
    rng = np.random.default_rng(0)
    groups = channels if depthwise else 1
    w = _const("w", (channels, channels // groups, 3, 3), rng)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)
    return _model([node], [("x", [1, channels, hw, hw])], "y", [w])


def matmul_model(m: int, k: int, n: int) -> onnx.ModelProto:
    w = _const("w", (k, n), np.random.default_rng(0))
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [m, k])], "y", [w])


def add_model(elements: int) -> onnx.ModelProto:
    node = helper.make_node("Add", ["a", "b"], ["y"])
    return _model([node], [("a", [elements]), ("b", [elements])], "y", [])


def chain_model(length: int) -> onnx.ModelProto:
    """``length`` tiny Adds in a row: their time is almost all per-op overhead."""
    c = _const("c", (1, 16), np.random.default_rng(0))
    names = ["x"] + [f"t{i}" for i in range(length)]
    nodes = [helper.make_node("Add", [names[i], "c"], [names[i + 1]]) for i in range(length)]
    return _model(nodes, [("x", [1, 16])], names[-1], [c])


def calibrate(
    name: str,
    threads: int = 0,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure this machine; ``threads`` as the user runs inference (0 = onnxruntime default)."""
    sizes = QUICK if quick else FULL
    config = RunConfig(threads=threads, warmup=2 if quick else 3, repeats=10 if quick else 30)

    def timed(what: str, model: onnx.ModelProto) -> float:
        if progress is not None:
            progress(what)
        return fastest_run(model, config)

    one = timed("call overhead", chain_model(1))
    chain = timed("per-op overhead", chain_model(sizes.chain))
    per_op = max(chain - one, 0.0) / (sizes.chain - 1)

    def measure(what: str, model: onnx.ModelProto, flops: float, nbytes: float) -> Measurement:
        # the one-tiny-op model's time is the call plus one op's overhead: what is left is the op
        own = max(timed(what, model) - one, 1e-9)
        return Measurement(what, flops, nbytes, own)

    c, hw = sizes.conv_channels, sizes.conv_hw
    conv = measure("dense conv 3x3", conv_model(c, hw, False), 2.0 * c * c * 9 * hw * hw, 0.0)
    c, hw = sizes.dw_channels, sizes.dw_hw
    dw = measure("depthwise conv 3x3", conv_model(c, hw, True), 2.0 * c * 9 * hw * hw, 0.0)
    m, k, n = sizes.matmul
    mm = measure("MatMul", matmul_model(m, k, n), 2.0 * m * k * n, 0.0)
    e = sizes.add_elements
    add = measure("elementwise Add", add_model(e), 0.0, 3.0 * e * 4)

    device = Device(
        name=name,
        peak_flops=conv.rate,
        mem_bandwidth=add.rate,
        note=(
            f"morphonnx calibrate{' --quick' if quick else ''} on {platform.node()} "
            f"({os.cpu_count()} CPUs, {platform.machine()}), onnxruntime {ort.__version__}, "
            f"threads {threads or 'default'}, {datetime.date.today().isoformat()}"
        ),
        op_peaks=(("conv", conv.rate), ("depthwise", dw.rate), ("gemm", mm.rate)),
        overhead=per_op,
        threads=threads,
    )
    chain_m = Measurement(f"{sizes.chain} tiny ops (per op)", 0.0, 0.0, per_op)
    return Calibration(device, [conv, dw, mm, add, chain_m], one)
