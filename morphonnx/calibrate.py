"""Measure this machine in onnxruntime and turn the numbers into a device profile.

Each number comes from a one-op model timed the way inference runs (same threads, warm-up; the
fastest run, since other processes on the machine only ever add time): attainable FLOP/s of a dense
3x3 conv, a depthwise 3x3 conv and a MatMul, memory bandwidth from a large elementwise Add, and a
fixed cost per op from a chain of tiny Adds. CPU conv kernels work on blocks of channels: the convs
are also timed with one channel fewer, and when that is clearly slower the profile gets
``_unaligned`` peaks and the smallest channel multiple (4, 8 or 16) that runs at speed. A run also
pays a fixed cost for the call itself; the time of a one-tiny-op model is subtracted from every
measurement, so only the op's own time is divided into its FLOPs or bytes.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from morphonnx.devices import Device
from morphonnx.runtime import random_feeds, session, time_runs

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


Probe = tuple[str, onnx.ModelProto, float, float]  # what, one-op model, FLOPs, bytes
_MULTIPLES = (4, 8, 16)
"""Channel multiples tried: depthwise convs 4 (8) channels narrower tell if 4 (8) is enough."""
_ALIGNED = 0.8
"""A width runs "at speed" when it reaches this fraction of the aligned width's rate."""

FULL = Sizes(64, 28, 192, 56, (128, 512, 512), 1 << 20, 64)
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
    """Measure this machine; ``threads`` as the user runs inference (0 = onnxruntime default).

    The one-op models are timed in rounds, one after the other, and each keeps its fastest run of
    all rounds: a busy spell of the machine then costs one round of one measurement, not all of
    it (and no single run is long enough to be preempted often)."""
    sizes = QUICK if quick else FULL
    rounds, repeats = (2, 5) if quick else (3, 20)
    c, hw = sizes.conv_channels, sizes.conv_hw
    dc, dhw = sizes.dw_channels, sizes.dw_hw
    m, k, n = sizes.matmul
    e = sizes.add_elements

    def conv(what: str, channels: int, size: int, depthwise: bool) -> Probe:
        per_out = 1 if depthwise else channels
        flops = 2.0 * channels * per_out * 9 * size * size
        return (what, conv_model(channels, size, depthwise), flops, 0.0)

    probes: list[Probe] = [
        ("call overhead", chain_model(1), 0.0, 0.0),
        (f"{sizes.chain} tiny ops", chain_model(sizes.chain), 0.0, 0.0),
        conv(f"dense conv 3x3, {c} ch", c, hw, False),
        conv(f"depthwise conv 3x3, {dc} ch", dc, dhw, True),
        ("MatMul", matmul_model(m, k, n), 2.0 * m * k * n, 0.0),
        ("elementwise Add", add_model(e), 0.0, 3.0 * e * 4),
        conv(f"dense conv 3x3, {c - 1} ch", c - 1, hw, False),
        conv(f"depthwise conv 3x3, {dc - 1} ch", dc - 1, dhw, True),
        *(conv(f"depthwise conv 3x3, {dc - q} ch", dc - q, dhw, True) for q in _MULTIPLES[:-1]),
    ]
    sessions = [session(model, threads) for _, model, _, _ in probes]
    feeds = [random_feeds(s) for s in sessions]
    best = [math.inf] * len(probes)
    for r in range(rounds):
        for i, (what, _, _, _) in enumerate(probes):
            if progress is not None:
                progress(f"{what} (round {r + 1} of {rounds})")
            times = time_runs(sessions[i], feeds[i], 2 if r == 0 else 0, repeats)
            best[i] = min(best[i], *times)
    one, chain = best[0], best[1]
    per_op = max(chain - one, 0.0) / (sizes.chain - 1)
    # the one-tiny-op model's time is the call plus one op's overhead: what is left is the op's own
    measured = [
        Measurement(what, flops, nbytes, max(t - one, 1e-9))
        for (what, _, flops, nbytes), t in zip(probes[2:], best[2:], strict=True)
    ]
    dense, dw, mm, add, dense_off, dw_off = measured[:6]
    peaks = [("conv", dense.rate), ("depthwise", dw.rate), ("gemm", mm.rate)]
    # channel counts off a multiple run slower: the smallest multiple whose counts run at speed
    multiple = None
    if min(dense_off.rate / dense.rate, dw_off.rate / dw.rate) < _ALIGNED:
        fast = [
            q
            for q, m in zip(_MULTIPLES, measured[6:], strict=False)
            if m.rate >= _ALIGNED * dw.rate
        ]
        multiple = fast[0] if fast else _MULTIPLES[-1]
        peaks += [("conv_unaligned", dense_off.rate), ("depthwise_unaligned", dw_off.rate)]
    device = Device(
        name=name,
        peak_flops=dense.rate,
        mem_bandwidth=add.rate,
        note=(
            f"morphonnx calibrate{' --quick' if quick else ''} on {platform.node()} "
            f"({os.cpu_count()} CPUs, {platform.machine()}), onnxruntime {ort.__version__}, "
            f"threads {threads or 'default'}, {datetime.date.today().isoformat()}"
        ),
        op_peaks=tuple(peaks),
        overhead=per_op,
        threads=threads,
        channel_multiple=multiple,
    )
    chain_m = Measurement(f"{sizes.chain} tiny ops (per op)", 0.0, 0.0, per_op)
    return Calibration(device, [*measured, chain_m], one)
