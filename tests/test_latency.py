"""Latency you can trust: per-op-kind device profiles, ``calibrate``, ``profile``, ``sweep``.

Measured numbers are checked for plausibility only (other processes share the CPU); everything the
code computes from them is checked against an independent computation (the roofline formula by
hand, scipy's Spearman, onnx.checker and onnxruntime on the written files).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from test_cli import assert_one_line_error, run
from torch_models import build_model, example_input

from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec
from morphonnx.analysis import analyze
from morphonnx.calibrate import FUSION_CHAINS, Calibration, ConvProbe, calibrate, fit_curve
from morphonnx.devices import Curve, Device, OpShape, profile_toml, resolve_device
from morphonnx.errors import MorphonnxError
from morphonnx.regularize import NUMPY, cost_and_loss
from morphonnx.runtime import random_feeds, session, time_runs
from morphonnx.sweep import ranks, spearman

PNG = b"\x89PNG\r\n\x1a\n"

PROFILE = """name = "box"
peak_gflops = 50
mem_bandwidth_gbps = 10
overhead_us = 2.5
threads = 1
channel_multiple = 16
fused_ops = ["BatchNormalization", "Clip"]

[peak_gflops_by_op]
conv = 40
depthwise = 4
gemm = 80
conv_unaligned = 20
depthwise_unaligned = 1

[efficiency.conv]
reduction_half = 20
positions_half = 10

[efficiency.depthwise]
positions_half = 30
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("latency_models")
    out = {}
    for name in ("tiny_mobilenet_v2", "tiny_resnet"):
        out[name] = folder / f"{name}.onnx"
        export_onnx(build_model(name), example_input(name), out[name])
    return out


@pytest.fixture()
def box(tmp_path: Path) -> Path:
    path = tmp_path / "box.toml"
    path.write_text(PROFILE)
    return path


def by_hand(
    flops: float,
    nbytes: float,
    kind: str | None,
    op: tuple[tuple[int, ...], float, float] = ((), 0, 0),
) -> float:
    """The box profile's roofline, written out: a conv with an input channel count off 16 is
    slower, and convs reach ``r / (r + 20) * p / (p + 10)`` of their peak (depthwise:
    ``p / (p + 30)``) at reduction length ``r`` and ``p`` output positions (``op``: channels, r,
    p)."""
    channels, r, p = op
    peaks = {"conv": 40e9, "depthwise": 4e9, "gemm": 80e9}
    peaks |= {"conv_unaligned": 20e9, "depthwise_unaligned": 1e9}
    efficiency = 1.0
    if kind == "conv":
        efficiency = r / (r + 20) * p / (p + 10)
    elif kind == "depthwise":
        efficiency = p / (p + 30)
    if kind in ("conv", "depthwise") and channels and channels[0] % 16:
        kind += "_unaligned"  # the input channels (an output count off 16 is padded)
    return 2.5e-6 + max(flops / (peaks.get(kind or "", 50e9) * efficiency), nbytes / 10e9)


# --- the profile format ----------------------------------------------------------------------


def test_per_op_profile_reads_and_round_trips(box: Path, tmp_path: Path) -> None:
    dev = resolve_device(str(box))
    assert dev.peak("conv") == 40e9 and dev.peak("depthwise") == 4e9 and dev.peak("gemm") == 80e9
    assert dev.peak(None) == 50e9 and dev.overhead == pytest.approx(2.5e-6) and dev.threads == 1
    assert dev.latency(8e9, 0, "depthwise") == pytest.approx(2.5e-6 + 2.0)
    assert dev.latency(8e9, 0, "depthwise", OpShape((32, 32))) == pytest.approx(2.5e-6 + 2.0)
    assert dev.latency(8e9, 0, "depthwise", OpShape((24, 24))) == pytest.approx(2.5e-6 + 8.0)
    assert dev.latency(8e9, 0, "conv", OpShape((17, 16))) == pytest.approx(2.5e-6 + 0.4)
    assert dev.latency(8e9, 0, "conv", OpShape((16, 17))) == pytest.approx(2.5e-6 + 0.2)
    assert dev.latency(8e9, 0, "gemm", OpShape((3, 5))) == pytest.approx(2.5e-6 + 0.1)
    assert dev.latency(0, 1e9, "gemm") == pytest.approx(2.5e-6 + 0.1)
    # efficiency: a 3x3 conv over 4 input channels (r = 36) on a 7x7 map (p = 49)
    want = 2.5e-6 + 8e9 / (20e9 * 36 / 56 * 49 / 59)
    assert dev.latency(8e9, 0, "conv", OpShape((4, 16), 36, 49)) == pytest.approx(want)
    assert dev.latency(8e9, 0, "depthwise", OpShape((32, 32), 9, 90)) == pytest.approx(
        2.5e-6 + 8e9 / (4e9 * 0.75)
    )
    assert dev.channel_multiple == 16 and dev.fused_ops == ("BatchNormalization", "Clip")
    again = tmp_path / "again.toml"
    again.write_text(profile_toml(dev))
    assert resolve_device(str(again)) == dev


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("overhead_us = -1\n", "overhead_us"),
        ("overhead_s = 1\noverhead_us = 1\n", "only one"),
        ("[peak_gflops_by_op]\nwinograd = 3\n", "winograd"),
        ("[peak_gflops_by_op]\nconv = 0\n", "conv"),
        ("peak_gflops_by_op = 3\n", "peak_gflops_by_op"),
        ("threads = -2\n", "threads"),
        ('fused_ops = "Relu"\n', "fused_ops"),
        ("fused_ops = [1]\n", "fused_ops"),
        ("[efficiency.winograd]\nreduction_half = 3\n", "winograd"),
        ("[efficiency.conv]\nreduction_half = -3\n", "reduction_half"),
        ("[efficiency.conv]\nhalf = 3\n", "half"),
        ("efficiency = 3\n", "efficiency"),
    ],
)
def test_bad_per_op_profiles(tmp_path: Path, extra: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\npeak_gflops = 1\nmem_bandwidth_gbps = 1\n' + extra)
    with pytest.raises(MorphonnxError) as info:
        resolve_device(str(path))
    msg = str(info.value)
    assert "\n" not in msg and "bad.toml" in msg and needle in msg


def test_analyze_json_uses_per_kind_peaks_and_overhead(
    models: dict[str, Path], box: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.json"
    rc, _, err = run(capsys, "analyze", models["tiny_mobilenet_v2"], "--device", box, "--json", out)
    assert rc == 0, err
    doc = json.loads(out.read_text())
    model = onnx.shape_inference.infer_shapes(onnx.load(str(models["tiny_mobilenet_v2"])))
    inits = {t.name: t for t in model.graph.initializer}
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info
    }
    dims |= {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for t in set(n.input):
            readers[t] = readers.get(t, 0) + 1

    def fused(node: onnx.NodeProto) -> bool:  # the box folds BatchNormalization and Clip
        while node.op_type in ("BatchNormalization", "Clip") and readers[node.input[0]] == 1:
            node = producer[node.input[0]]
            if node.op_type == "Conv":
                return True
        return False

    kinds = set()
    total = 0.0
    for op in doc["ops"]:
        node = next(n for n in model.graph.node if n.name == op["name"])
        kind, shape = None, ((), 0.0, 0.0)
        if op["op_type"] == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            w = inits[node.input[1]].dims
            kind = "depthwise" if group > 1 and w[1] == 1 else "conv"
            channels = (dims[node.input[0]][1], dims[node.output[0]][1])
            y = dims[node.output[0]]
            shape = (channels, w[1] * w[2] * w[3], y[0] * y[2] * y[3])
            kinds.add((kind, channels[0] % 16 != 0))
        elif op["op_type"] in ("Gemm", "MatMul"):
            kind = "gemm"
        kinds.add(kind)
        if fused(node):
            kinds.add("fused")
            assert op["bound"]["box"] == "fused"
        want = (
            0.0
            if op["op_type"] == "Constant" or fused(node)
            else by_hand(op["flops"], op["bytes"], kind, shape)
        )
        assert op["latency_s"]["box"] == pytest.approx(want, rel=1e-12)
        total += want
    for case in (("conv", True), ("conv", False), ("depthwise", True), ("depthwise", False)):
        assert case in kinds  # aligned and unaligned convs of both kinds are exercised
    assert {"conv", "depthwise", "gemm", "fused", None} <= kinds
    assert doc["totals"]["latency_s"]["box"] == pytest.approx(total, rel=1e-9)


def test_latency_loss_uses_the_same_roofline_as_analyze(
    models: dict[str, Path], box: Path, tmp_path: Path
) -> None:
    net = build_model("tiny_mobilenet_v2")
    spec = tmp_path / "spec.json"
    export_spec(net, example_input("tiny_mobilenet_v2"), spec)
    dev = resolve_device(str(box))
    a = analyze(models["tiny_mobilenet_v2"], devices=[dev])
    costed = {t["op"] for t in json.loads(spec.read_text())["costs"]}
    want = sum(c.latency(dev) for c in a.costs if c.name in costed)
    assert any(c.kind == "depthwise" for c in a.costs if c.name in costed)
    got = Regularizer(net, str(spec), cost="latency", device=str(box), threshold=0.0).cost()
    assert got == pytest.approx(want, rel=1e-9)
    # with channels dead (alignment changes): the core formula agrees with analyze's prediction
    doc = json.loads(spec.read_text())
    rng = np.random.default_rng(0)
    keep = {g["id"]: rng.random(g["channels"]) < 0.6 for g in doc["groups"] if g["prunable"]}
    for k in keep.values():
        k[0] = True
    vectors = {gid: k.astype(float) for gid, k in keep.items()}
    cost, _ = cost_and_loss(NUMPY, doc, vectors, cost="latency", threshold=0.5, device=dev)
    costs, _ = a.predict({gid: k.tolist() for gid, k in keep.items()})
    assert cost == pytest.approx(sum(c.latency(dev) for c in costs if c.name in costed), rel=1e-9)


def test_builtin_profiles_have_no_overhead_or_kind_peaks() -> None:
    # MorphNet's table: Inception-V2 Conv2d_2c_3x3 on P100, whatever kind the op is
    flops = 2 * 56 * 56 * 64 * 192 * 9
    nbytes = (56 * 56 * 64 + 56 * 56 * 192) * 4 + 64 * 192 * 9 * 4
    p100 = resolve_device("P100")
    for kind in (None, "conv", "depthwise", "gemm"):
        assert p100.latency(flops, nbytes, kind) == pytest.approx(74.6e-6, rel=0.005)


def _conv_then(ops: list[str], reread: bool = False) -> onnx.ModelProto:
    """x -> Conv -> ops[0] -> ops[1] ... (``reread``: the Conv's output is also a graph output, so
    no runtime can fold what follows into the conv). ``Add`` adds the graph input ``s`` as a
    residual join does; ``Add.r`` is the same Add with ``s`` as its first input."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3), np.float32), "w")]
    nodes = [onnx.helper.make_node("Conv", ["x", "w"], ["t0"], pads=[1, 1, 1, 1], name="conv")]
    for i, op in enumerate(ops):
        extra = {"BatchNormalization": 4, "Clip": 0}.get(op, 0)
        names = [f"p{i}_{j}" for j in range(extra)]
        inits += [onnx.numpy_helper.from_array(np.ones(8, np.float32), n) for n in names]
        ins = {"Add": [f"t{i}", "s"], "Add.r": ["s", f"t{i}"]}.get(op, [f"t{i}", *names])
        nodes.append(
            onnx.helper.make_node(op[:3] if op == "Add.r" else op, ins, [f"t{i + 1}"], name=f"n{i}")
        )
    f32 = onnx.TensorProto.FLOAT
    outs = [onnx.helper.make_tensor_value_info(f"t{len(ops)}", f32, None)]
    if reread:
        outs.append(onnx.helper.make_tensor_value_info("t0", f32, None))
    inputs = [onnx.helper.make_tensor_value_info("x", f32, [1, 4, 8, 8])]
    if any(op.startswith("Add") for op in ops):
        inputs.append(onnx.helper.make_tensor_value_info("s", f32, [1, 8, 8, 8]))
    graph = onnx.helper.make_graph(nodes, "g", inputs, outs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    "ops, reread, fused",
    [
        (["BatchNormalization", "Relu"], False, ["n0", "n1"]),
        (["BatchNormalization", "Sigmoid", "Relu"], False, ["n0"]),  # Sigmoid is not folded
        (["Relu", "BatchNormalization"], False, ["n0", "n1"]),
        (["BatchNormalization", "Relu"], True, []),  # the conv's output is read twice
        (["Sigmoid"], False, []),
        (["BatchNormalization", "Add", "Relu"], False, ["n0", "n1", "n2"]),  # a residual join
        (["BatchNormalization", "Add.r", "Relu"], False, ["n0", "n1", "n2"]),  # conv on its right
        (["Sigmoid", "Add", "Relu"], False, []),
        (["Add", "Relu"], True, []),
    ],
)
def test_fused_ops_cost_nothing_only_right_after_a_conv(
    tmp_path: Path, ops: list[str], reread: bool, fused: list[str]
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_conv_then(ops, reread), path)
    fused_ops = ("BatchNormalization", "Relu", "Add")
    folds = Device("folds", 1e9, 1e9, overhead=1e-6, fused_ops=fused_ops)
    plain = Device("plain", 1e9, 1e9, overhead=1e-6)
    a = analyze(path, devices=[folds, plain])
    for c in a.costs:
        if c.name in fused:
            assert c.latency(folds) == 0.0 and c.bound(folds) == "fused"
        else:  # every other op costs its own roofline time: 1 us + max(flops, bytes) / 1e9
            want = 1e-6 + max(c.flops or 0, c.bytes or 0) / 1e9
            assert c.latency(folds) == pytest.approx(want) and c.bound(folds) != "fused"
        assert c.latency(plain) == pytest.approx(1e-6 + max(c.flops or 0, c.bytes or 0) / 1e9)
    total = sum(c.latency(folds) or 0.0 for c in a.costs)
    assert a.totals.latency["folds"] == pytest.approx(total)


def test_a_residual_add_folds_into_the_conv_on_either_side(tmp_path: Path) -> None:
    """Add(Sigmoid(conv_a(x)), BatchNormalization(conv_b(x))) -> Relu: the Sigmoid keeps the Add
    out of conv_a, but the runtime accumulates it (and the Relu after it) into conv_b."""
    rng = np.random.default_rng(0)
    f32 = onnx.TensorProto.FLOAT
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3), np.float32), n)
        for n in ("wa", "wb")
    ]
    bn = ["scale", "bias", "mean", "var"]
    inits += [onnx.numpy_helper.from_array(np.ones(8, np.float32), n) for n in bn]
    make = onnx.helper.make_node
    nodes = [
        make("Conv", ["x", "wa"], ["a"], pads=[1] * 4, name="conv_a"),
        make("Conv", ["x", "wb"], ["b"], pads=[1] * 4, name="conv_b"),
        make("Sigmoid", ["a"], ["sa"], name="sigmoid"),
        make("BatchNormalization", ["b", *bn], ["nb"], name="bn"),
        make("Add", ["sa", "nb"], ["y"], name="add"),
        make("Relu", ["y"], ["r"], name="relu"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", f32, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("r", f32, None)],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), path)
    folds = Device("folds", 1e9, 1e9, fused_ops=("BatchNormalization", "Relu", "Add"))
    no_add = Device("no_add", 1e9, 1e9, fused_ops=("BatchNormalization", "Relu"))
    costs = {c.name: c for c in analyze(path, devices=[folds, no_add]).costs}
    assert {n for n, c in costs.items() if c.bound(folds) == "fused"} == {"bn", "add", "relu"}
    assert {n for n, c in costs.items() if c.bound(no_add) == "fused"} == {"bn"}
    add_bytes = 3 * 8 * 8 * 8 * 4  # two fp32 1x8x8x8 inputs and the output, at 1 GB/s
    assert costs["add"].latency(no_add) == pytest.approx(add_bytes / 1e9)


@given(
    st.floats(0, 1e4),
    st.floats(0, 1e4),
    st.floats(0.5, 1e6),
    st.floats(0.5, 1e6),
    st.floats(1.01, 10),
)
def test_efficiency_curve_rises_and_stays_at_most_one(
    rh: float, ph: float, r: float, pos: float, more: float
) -> None:
    curve = Curve(rh, ph)
    assert 0 < curve(r, pos) <= 1
    assert curve(r * more, pos) >= curve(r, pos) and curve(r, pos * more) >= curve(r, pos)
    assert curve(0, 0) == 1.0  # unknown shape: the plain peak


def test_fit_curve_recovers_a_known_curve() -> None:
    truth = Curve(16.0, 100.0)
    shapes = [OpShape((), r, p) for r in (8, 32, 128, 576) for p in (49, 784)]
    points = [(op, 90e9 * truth(op.reduction, op.positions)) for op in shapes]
    peak, curve = fit_curve(points)
    assert peak == pytest.approx(90e9, rel=0.1)
    # the grid has 10 points per decade: within one step of the truth
    assert curve.reduction_half == pytest.approx(16.0, rel=0.26)
    assert curve.positions_half == pytest.approx(100.0, rel=0.26)
    # rates that do not vary in positions fit no positions factor
    flat = [(OpShape((), r, 49), 50e9 * r / (r + 10)) for r in (8, 32, 128)]
    assert fit_curve(flat)[1].positions_half == 0.0


# --- calibrate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_calibration() -> Calibration:
    return calibrate("here", threads=1, quick=True)


def test_calibrate_numbers_are_plausible(quick_calibration: Calibration) -> None:
    c = quick_calibration
    d = c.device
    for kind in ("conv", "depthwise", "gemm"):
        assert 1e7 < d.peak(kind) < 1e13, kind  # 10 MFLOP/s .. 10 TFLOP/s on one thread
    assert 1e8 < d.mem_bandwidth < 1e12
    assert 0 <= d.overhead < 1e-3 and 0 < c.call_overhead < 1e-2
    assert d.threads == 1
    assert d.channel_multiple in (None, 4, 8, 16)
    if d.channel_multiple:  # unaligned widths were measured clearly slower for conv or depthwise
        odd = (d.channel_multiple + 1,)
        slow = [d.peak(k, OpShape(odd)) / d.peak(k) for k in ("conv", "depthwise")]
        assert min(slow) < 0.8
    for m in c.measurements:
        assert m.seconds > 0 and math.isfinite(m.seconds)
    probed = {op for chain in FUSION_CHAINS for op in chain}
    assert set(d.fused_ops) <= probed
    curves = dict(d.curves)
    assert set(curves) == {"conv", "depthwise"}
    for curve in curves.values():
        assert 0 <= curve.reduction_half < 1e5 and 0 <= curve.positions_half < 1e5


@pytest.mark.parametrize(
    "probe",
    [
        ConvProbe(24, 48, 14, kernel=1),
        ConvProbe(32, 32, 14),
        ConvProbe(30, 30, 14),
        ConvProbe(96, 96, 14, depthwise=True),
        ConvProbe(90, 90, 28, depthwise=True),
    ],
    ids=lambda p: p.what(),
)
def test_calibrated_latency_is_within_a_factor_of_onnxruntime(
    quick_calibration: Calibration, probe: ConvProbe
) -> None:
    """Shapes calibrate did not time: the profile's prediction (fastest runs) against the
    fastest onnxruntime run less the call's own cost. Within 15% on a quiet 2-core VM; factor 3
    either way here, since a quick calibration on a machine other processes share is rough (the
    benchmark measures how well the profile ranks)."""
    d = quick_calibration.device
    sess = session(probe.model(), threads=1)
    feeds = random_feeds(sess)
    own = min(time_runs(sess, feeds, 2, 30)) - quick_calibration.call_overhead
    nbytes = 4.0 * (probe.cin + probe.cout) * probe.hw**2  # input and output, fp32
    predicted = d.latency(
        probe.flops, nbytes, "depthwise" if probe.depthwise else "conv", probe.shape
    )
    assert 1 / 3 < predicted / max(own, 1e-7) < 3


def test_calibrate_cli_profile_works_everywhere(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prof = tmp_path / "mymachine.toml"
    rc, out, err = run(capsys, "calibrate", "-o", prof, "--quick", "--threads", "1")
    assert rc == 0, err
    dev = resolve_device(str(prof))
    assert dev.name == "mymachine" and dev.overhead > 0
    assert {"conv", "depthwise", "gemm"} <= {k for k, _ in dev.op_peaks}
    spec = tmp_path / "spec.json"
    rc, _, err = run(capsys, "spec", models["tiny_resnet"], "--device", prof, "-o", spec)
    assert rc == 0, err
    js = tmp_path / "a.json"
    rc, _, err = run(capsys, "analyze", models["tiny_resnet"], "--device", prof, "--json", js)
    assert rc == 0, err
    lat = json.loads(js.read_text())["totals"]["latency_s"]["mymachine"]
    a = analyze(models["tiny_resnet"], devices=[dev])
    assert lat == pytest.approx(sum(c.latency(dev) for c in a.costs)) and lat > 0
    # not TOML: refused before measuring, nothing written
    rc, _, err = run(capsys, "calibrate", "-o", tmp_path / "m.json", "--quick")
    assert rc == 1 and not (tmp_path / "m.json").exists()
    assert_one_line_error(err, "m.json")


# --- profile -----------------------------------------------------------------------------------


def test_profile_covers_every_node(
    models: dict[str, Path], box: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.json"
    path = models["tiny_mobilenet_v2"]
    rc, text, err = run(capsys, "profile", path, "--device", box, "--repeats", "3", "--json", out)
    assert rc == 0, err
    assert "Where the model misses" in text
    doc = json.loads(out.read_text())
    model = onnx.load(str(path))
    assert len(doc["nodes"]) == len(model.graph.node)
    a = analyze(path, devices=[resolve_device(str(box))])
    predicted = {c.name: c.latency(a.devices[0]) for c in a.costs}
    for n in doc["nodes"]:
        if n["op_type"] != "Constant":  # onnxruntime makes Constant nodes initializers
            assert n["measured_s"] is not None and n["measured_s"] > 0, n["name"]
        assert n["predicted_s"] == pytest.approx(predicted[n["name"]])
    measured = sum(n["measured_s"] or 0.0 for n in doc["nodes"])
    assert doc["totals"]["measured_s"] == pytest.approx(measured)
    per_type = {t["op_type"]: t for t in doc["op_types"]}
    conv = [n for n in doc["nodes"] if n["op_type"] == "Conv"]
    assert per_type["Conv"]["nodes"] == len(conv)
    assert per_type["Conv"]["measured_s"] == pytest.approx(sum(n["measured_s"] for n in conv))
    assert 0 < doc["run_s"]


def test_profile_names_unnamed_nodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nodes without names would all share one profiler name; each must get its own time."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
    )
    path = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    out = tmp_path / "p.json"
    rc, _, err = run(capsys, "profile", path, "--repeats", "2", "--json", out)
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert [n["op_type"] for n in doc["nodes"]] == ["Relu", "Sigmoid"]
    assert all(n["measured_s"] for n in doc["nodes"]) and doc["nodes"][0]["name"] != ""


# --- sweep -------------------------------------------------------------------------------------


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 6, 15).astype(float)  # many ties
        y = x + rng.normal(0, 2, 15)
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert list(ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_sweep_writes_distinct_valid_models_and_resumes(
    models: dict[str, Path], box: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = models["tiny_mobilenet_v2"]
    kept = tmp_path / "variants"
    kept.mkdir()
    out, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    argv = ["sweep", path, "--device", box, "-o", out, "--repeats", "2", "--warmup", "1"]
    rc, text, err = run(capsys, *argv, "-n", 4, "--keep-models", kept, "--plot", png)
    assert rc == 0, err
    rows = list(csv.DictReader(out.open()))
    assert [r["variant"] for r in rows] == ["0", "1", "2", "3"]
    files = sorted(kept.glob("variant_*.onnx"))
    assert len(files) == 4
    digests = set()
    x = example_input("tiny_mobilenet_v2").numpy()
    full = analyze(path)
    for f, row in zip(files, rows, strict=True):
        onnx.checker.check_model(str(f), full_check=True)
        y = ort.InferenceSession(str(f)).run(None, {"input": x})[0]
        assert y.shape == (1, 10) and np.isfinite(y).all()
        small = analyze(f)
        assert small.totals.flops == int(row["flops"]) < full.totals.flops
        assert small.totals.params == int(row["params"])
        assert float(row["measured_s"]) > 0 and float(row["relative"]) > 0
        digests.add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert len(digests) == 4
    measured = [float(r["relative"]) for r in rows]
    for col in ("flops", "params", "latency_CPU_s", "latency_box_s"):
        want = scipy.stats.spearmanr([float(r[col]) for r in rows], measured).statistic
        assert -1.0 <= want <= 1.0
        shown = next(line for line in text.splitlines() if f" {col} " in line)
        assert f"{want:.3f}" in shown
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000

    # resume: the four rows stay as they were, one more variant is measured
    rc, _, err = run(capsys, *argv, "-n", 5)
    assert rc == 0, err
    again = list(csv.DictReader(out.open()))
    assert again[:4] == rows and again[4]["variant"] == "4"
    # another seed (or model) is refused, the CSV is left alone
    before = out.read_bytes()
    rc, _, err = run(capsys, *argv, "-n", 5, "--seed", "9")
    assert rc == 1 and out.read_bytes() == before
    assert_one_line_error(err, "sweep.csv", "another model or seed")


def test_plots_need_matplotlib(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    png = tmp_path / "roof.png"
    rc, _, err = run(capsys, "analyze", models["tiny_resnet"], "--plot", png)
    assert rc == 1 and not png.exists()
    assert_one_line_error(err, "roof.png", "matplotlib")


def test_analyze_plot_is_a_png(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "roof.png"
    rc, _, err = run(capsys, "analyze", models["tiny_resnet"], "--device", "CPU", "--plot", png)
    assert rc == 0, err
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000


def _conv_nchw(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A stride-1 'same' conv in numpy (one group), float64."""
    k = w.shape[-1]
    pad = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", pad[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    return out


def test_a_row_probe_computes_its_convs_in_turn() -> None:
    """``calibrate``'s small-map probe is a row of convs with weights of their own: onnxruntime
    computes them one after the other, and the FLOPs counted are the row's."""
    probe = ConvProbe(4, 4, 6, depth=3)
    model = probe.model()
    inits = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }
    assert len(inits) == 3  # weights of their own, not one tensor read three times
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    want = x.astype(np.float64)
    for name in ("w", "wr1", "wr2"):
        want = _conv_nchw(want, inits[name])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert probe.flops == 3 * ConvProbe(4, 4, 6).flops == 3 * 2 * 4 * 9 * 4 * 36
    with pytest.raises(ValueError):
        ConvProbe(4, 8, 6, depth=2)  # a row maps c channels to c


@pytest.mark.parametrize("chain", FUSION_CHAINS, ids="+".join)
def test_fusion_probes_compute_what_they_say(chain: tuple[str, ...]) -> None:
    """Each fusion probe of ``calibrate`` runs in onnxruntime and computes its conv followed by
    its chain (an Add adds a second conv of the same input): the timings compare like with like."""
    probe = ConvProbe(4, 8, 6, after=chain)
    model = probe.model()
    inits = {
        t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer
    }
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    want = _conv_nchw(x.astype(np.float64), inits["w"])
    for i, op in enumerate(chain):
        if op == "Add":
            want = want + _conv_nchw(x.astype(np.float64), inits[f"w{i}"])
        elif op == "Relu":
            want = np.maximum(want, 0)
        elif op == "Clip":
            want = np.clip(want, 0, 6)
        # BatchNormalization with scale 1, bias 0, mean 0, var 1 is the identity (up to eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert probe.convs == 1 + chain.count("Add")
    assert probe.flops == 2 * 4 * 9 * 8 * 36 * probe.convs
