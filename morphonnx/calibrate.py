"""Measure this machine in onnxruntime and turn the numbers into a device profile.

Each number comes from a small model timed the way inference runs (same threads, warm-up; the
fastest run, since other processes on the machine only ever add time): attainable FLOP/s of dense
convs (pointwise over 8 to 128 input channels, 3x3 on a large map, and on a 7x7 map a row of
3x3 convs over as many channels as networks have there, 8x the large map's, each with weights of
its own: a conv on a small map uses each weight for few outputs, and in a model those weights
come from memory, not from a cache a lone small conv would keep them in), of depthwise 3x3 convs
(small to large maps) and of a MatMul, memory bandwidth from a large elementwise Add, and a fixed
cost per op from a chain of tiny Adds. A kernel reaches its peak only on enough work: the dense and
depthwise rates are fitted with an efficiency curve (:class:`morphonnx.devices.Curve`) whose
asymptote is the kind's peak. CPU conv kernels work on blocks of channels: the convs are also
timed with one input channel fewer, and when that is clearly slower the profile gets
``_unaligned`` peaks and the smallest channel multiple (4, 8 or 16) that runs at speed. A conv
followed by BatchNormalization + Relu, one followed by Clip, and two convs joined by Add + Relu (a
residual block) tell which ops onnxruntime folds into the conv (``fused_ops``). A run also pays a
fixed cost for the call itself; the time of a one-tiny-op model is subtracted from every
measurement, so only the ops' own time is divided into FLOPs or bytes.
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

from morphonnx.devices import Curve, Device, OpShape
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


Probe = tuple[str, onnx.ModelProto, float, float]  # what, small model, FLOPs, bytes
_MULTIPLES = (4, 8, 16)
"""Channel multiples tried: depthwise convs 4 (8) channels narrower tell if 4 (8) is enough."""
_ALIGNED = 0.8
"""A width runs "at speed" when it reaches this fraction of the aligned width's rate."""

_FUSED_AT = 0.5
"""Ops after a conv count as fused when they add less than this fraction of their memory passes."""
FUSION_CHAINS = (("BatchNormalization", "Relu"), ("Clip",), ("Add", "Relu"))
"""Ops timed after a conv; an ``Add`` adds a second conv's output, as a residual block does."""
_HALVES = (0.0, *np.geomspace(1.0, 1e4, 41).tolist())
"""Candidate halves of a fitted efficiency curve (0: no such factor)."""

FULL = Sizes(64, 28, 192, 56, (128, 512, 512), 1 << 20, 64)
QUICK = Sizes(32, 28, 64, 28, (64, 256, 256), 1 << 18, 32)


def curve_probes(sizes: Sizes) -> tuple[list[ConvProbe], list[ConvProbe]]:
    """Aligned dense and depthwise convs over a range of reduction lengths and map sizes, the
    first of each being the probe the kind's ``_unaligned`` peak is compared with."""
    c, hw, dc, dhw = sizes.conv_channels, sizes.conv_hw, sizes.dw_channels, sizes.dw_hw
    dense = [ConvProbe(c, c, hw), ConvProbe(8 * c, 8 * c, 7, depth=4)]
    dense += [ConvProbe(cin, c, hw, kernel=1) for cin in (8, 32, 128)]
    depthwise = [ConvProbe(dc, dc, dhw, depthwise=True)]
    depthwise += [ConvProbe(64, 64, s, depthwise=True) for s in (7, 14, 28) if s < dhw]
    return dense, depthwise


def fit_curve(points: list[tuple[OpShape, float]]) -> tuple[float, Curve]:
    """The peak and :class:`Curve` whose ``peak x curve(shape)`` best fits the measured rates
    (least squares in log space over a grid of halves; a half is fitted only when the points vary
    in its variable, else 0). The curve is rising and at most 1, so the peak is its asymptote."""
    log_rates = np.log([rate for _, rate in points])
    reductions = np.array([op.reduction for op, _ in points])
    positions = np.array([op.positions for op, _ in points])
    best: tuple[float, float, Curve] | None = None
    for rh in _HALVES if np.ptp(reductions) > 0 else (0.0,):
        for ph in _HALVES if np.ptp(positions) > 0 else (0.0,):
            curve = Curve(rh, ph)
            shape = np.log([curve(r, p) for r, p in zip(reductions, positions, strict=True)])
            log_peak = float(np.mean(log_rates - shape))
            err = float(np.sum((log_rates - shape - log_peak) ** 2))
            if best is None or err < best[0] - 1e-12:
                best = (err, math.exp(log_peak), curve)
    assert best is not None
    return best[1], best[2]


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


@dataclass(frozen=True)
class ConvProbe:
    """A 'same' conv: dense (``cin`` -> ``cout``) or depthwise (``cin`` channels), with the ops in
    ``after`` applied to its output; each ``Add`` in them adds the output of one more such conv
    of the same input (a residual join). ``depth`` > 1: that many such convs in a row (then
    ``cin`` == ``cout``), each with weights of its own."""

    cin: int
    cout: int
    hw: int
    kernel: int = 3
    depthwise: bool = False
    after: tuple[str, ...] = ()
    depth: int = 1

    def __post_init__(self) -> None:
        if self.depth > 1 and (self.cin != self.cout or self.after):
            raise ValueError("a row of convs maps c channels to c, with nothing after them")

    @property
    def macs_per_output(self) -> float:
        return float(self.kernel * self.kernel * (1 if self.depthwise else self.cin))

    @property
    def convs(self) -> int:
        return 1 + self.after.count("Add")

    @property
    def flops(self) -> float:
        return 2.0 * self.macs_per_output * self.cout * self.hw * self.hw * self.convs * self.depth

    @property
    def shape(self) -> OpShape:
        return OpShape((self.cin, self.cout), self.macs_per_output, float(self.hw * self.hw))

    def what(self) -> str:
        kind = f"depthwise {self.cin}" if self.depthwise else f"{self.cin}->{self.cout}"
        tail = "".join(f" + {'Add of a second conv' if op == 'Add' else op}" for op in self.after)
        row = f", {self.depth} in a row" if self.depth > 1 else ""
        return f"conv {self.kernel}x{self.kernel} {kind} ch, {self.hw}x{self.hw}{tail}{row}"

    def model(self) -> onnx.ModelProto:
        rng = np.random.default_rng(0)
        groups = self.cin if self.depthwise else 1
        k = self.kernel
        w = (self.cout, self.cin // groups, k, k)

        def conv(weight: str, out: str, x: str = "x") -> onnx.NodeProto:
            inits.append(_const(weight, w, rng))
            return helper.make_node("Conv", [x, weight], [out], pads=[k // 2] * 4, group=groups)

        inits: list[onnx.TensorProto] = []
        row = ["x"] + [f"r{i}" for i in range(1, self.depth)] + ["y0"]
        nodes = [conv(f"wr{i}" if i else "w", row[i + 1], row[i]) for i in range(self.depth)]
        for i, op in enumerate(self.after):
            if op == "Add":
                nodes.append(conv(f"w{i}", f"skip{i}"))
                extra = [f"skip{i}"]
            else:
                extra = [f"{op}{i}_{j}" for j in range(_EXTRA_INPUTS.get(op, 0))]
                inits += [_norm_param(name, j, self.cout) for j, name in enumerate(extra)]
            nodes.append(helper.make_node(op, [f"y{i}", *extra], [f"y{i + 1}"]))
        x = [("x", [1, self.cin, self.hw, self.hw])]
        return _model(nodes, x, f"y{len(self.after)}", inits)


_EXTRA_INPUTS = {"BatchNormalization": 4, "Clip": 2}
"""Constant inputs of the ops a fusion probe appends: scale, bias, mean, var; min, max."""


def _norm_param(name: str, j: int, channels: int) -> onnx.TensorProto:
    if name.startswith("Clip"):
        return numpy_helper.from_array(np.array(6.0 * j, dtype=np.float32), name)
    return numpy_helper.from_array(np.full(channels, [1.0, 0.0, 0.0, 1.0][j], np.float32), name)


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

    The models are timed in rounds, one after the other, and each keeps its fastest run of all
    rounds: a busy spell of the machine then costs one round of one measurement, not all of it
    (and no single run is long enough to be preempted often)."""
    sizes = QUICK if quick else FULL
    rounds, repeats = (2, 5) if quick else (3, 20)
    m, k, n = sizes.matmul
    e = sizes.add_elements
    dense, depthwise = curve_probes(sizes)
    off = [
        ConvProbe(dense[0].cin - 1, dense[0].cout, dense[0].hw),
        *(
            ConvProbe(depthwise[0].cin - q, depthwise[0].cin - q, depthwise[0].hw, depthwise=True)
            for q in (1, *_MULTIPLES[:-1])
        ),
    ]
    plain = ConvProbe(16, 64, 56, kernel=1)
    fusion = [plain, *(ConvProbe(16, 64, 56, kernel=1, after=chain) for chain in FUSION_CHAINS)]
    convs = [*dense, *depthwise, *off, *fusion]
    probes: list[Probe] = [
        ("call overhead", chain_model(1), 0.0, 0.0),
        (f"{sizes.chain} tiny ops", chain_model(sizes.chain), 0.0, 0.0),
        ("MatMul", matmul_model(m, k, n), 2.0 * m * k * n, 0.0),
        ("elementwise Add", add_model(e), 0.0, 3.0 * e * 4),
        *((c.what(), c.model(), c.flops, 0.0) for c in convs),
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
    # the one-tiny-op model's time is the call plus one op's overhead: what is left is the ops' own
    measured = [
        Measurement(what, flops, nbytes, max(t - one, 1e-9))
        for (what, _, flops, nbytes), t in zip(probes[2:], best[2:], strict=True)
    ]
    mm, add = measured[:2]
    by_probe = dict(zip(convs, measured[2:], strict=True))
    conv_peak, conv_curve = fit_curve([(c.shape, by_probe[c].rate) for c in dense])
    dw_peak, dw_curve = fit_curve([(c.shape, by_probe[c].rate) for c in depthwise])
    peaks = [("conv", conv_peak), ("depthwise", dw_peak), ("gemm", mm.rate)]
    # channel counts off a multiple run slower: the smallest multiple whose counts run at speed
    dense_slow = by_probe[off[0]].rate / by_probe[dense[0]].rate
    dw_rate = by_probe[depthwise[0]].rate
    dw_slow = by_probe[off[1]].rate / dw_rate
    multiple = None
    if min(dense_slow, dw_slow) < _ALIGNED:
        fast = [
            q
            for q, p in zip(_MULTIPLES, off[2:], strict=False)
            if by_probe[p].rate >= _ALIGNED * dw_rate
        ]
        multiple = fast[0] if fast else _MULTIPLES[-1]
        peaks += [
            ("conv_unaligned", conv_peak * dense_slow),
            ("depthwise_unaligned", dw_peak * dw_slow),
        ]
    # ops after a conv that add (almost) no time are folded into it by the runtime
    out_pass = 2.0 * plain.cout * plain.hw * plain.hw * 4 / add.rate  # read + write its output
    fused = [
        op
        for p in fusion[1:]
        if by_probe[p].seconds - p.convs * by_probe[plain].seconds
        < _FUSED_AT * out_pass * len(p.after)
        for op in p.after
    ]
    fused = list(dict.fromkeys(fused))
    device = Device(
        name=name,
        peak_flops=conv_peak,
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
        fused_ops=tuple(fused),
        curves=(("conv", conv_curve), ("depthwise", dw_curve)),
    )
    chain_m = Measurement(f"{sizes.chain} tiny ops (per op)", 0.0, 0.0, per_op)
    return Calibration(device, [*measured, chain_m], one)
