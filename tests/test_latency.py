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
from test_cli import assert_one_line_error, run
from torch_models import build_model, example_input

from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec
from morphonnx.analysis import analyze
from morphonnx.calibrate import calibrate
from morphonnx.devices import OpShape, profile_toml, resolve_device
from morphonnx.errors import MorphonnxError
from morphonnx.regularize import NUMPY, cost_and_loss
from morphonnx.sweep import ranks, spearman

PNG = b"\x89PNG\r\n\x1a\n"

PROFILE = """name = "box"
peak_gflops = 50
mem_bandwidth_gbps = 10
overhead_us = 2.5
threads = 1
channel_multiple = 16

[peak_gflops_by_op]
conv = 40
depthwise = 4
gemm = 80
conv_unaligned = 20
depthwise_unaligned = 1
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


def by_hand(flops: float, nbytes: float, kind: str | None, channels: tuple[int, ...] = ()) -> float:
    """The box profile's roofline, written out: a conv with a channel count off 16 is slower."""
    peaks = {"conv": 40e9, "depthwise": 4e9, "gemm": 80e9}
    peaks |= {"conv_unaligned": 20e9, "depthwise_unaligned": 1e9}
    if kind in ("conv", "depthwise") and any(c % 16 for c in channels):
        kind += "_unaligned"
    return 2.5e-6 + max(flops / peaks.get(kind or "", 50e9), nbytes / 10e9)


# --- the profile format ----------------------------------------------------------------------


def test_per_op_profile_reads_and_round_trips(box: Path, tmp_path: Path) -> None:
    dev = resolve_device(str(box))
    assert dev.peak("conv") == 40e9 and dev.peak("depthwise") == 4e9 and dev.peak("gemm") == 80e9
    assert dev.peak(None) == 50e9 and dev.overhead == pytest.approx(2.5e-6) and dev.threads == 1
    assert dev.latency(8e9, 0, "depthwise") == pytest.approx(2.5e-6 + 2.0)
    assert dev.latency(8e9, 0, "depthwise", OpShape((32, 32))) == pytest.approx(2.5e-6 + 2.0)
    assert dev.latency(8e9, 0, "depthwise", OpShape((24, 24))) == pytest.approx(2.5e-6 + 8.0)
    assert dev.latency(8e9, 0, "conv", OpShape((16, 17))) == pytest.approx(2.5e-6 + 0.4)
    assert dev.latency(8e9, 0, "gemm", OpShape((3, 5))) == pytest.approx(2.5e-6 + 0.1)
    assert dev.latency(0, 1e9, "gemm") == pytest.approx(2.5e-6 + 0.1)
    assert dev.channel_multiple == 16
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
    kinds = set()
    total = 0.0
    for op in doc["ops"]:
        kind, channels = None, ()
        if op["op_type"] == "Conv":
            node = next(n for n in model.graph.node if n.name == op["name"])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kind = "depthwise" if group > 1 and inits[node.input[1]].dims[1] == 1 else "conv"
            channels = (dims[node.input[0]][1], dims[node.output[0]][1])
            kinds.add((kind, any(c % 16 for c in channels)))
        elif op["op_type"] in ("Gemm", "MatMul"):
            kind = "gemm"
        kinds.add(kind)
        want = (
            0.0
            if op["op_type"] == "Constant"
            else by_hand(op["flops"], op["bytes"], kind, channels)
        )
        assert op["latency_s"]["box"] == pytest.approx(want, rel=1e-12)
        total += want
    for case in (("conv", True), ("conv", False), ("depthwise", True), ("depthwise", False)):
        assert case in kinds  # aligned and unaligned convs of both kinds are exercised
    assert {"conv", "depthwise", "gemm", None} <= kinds
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


# --- calibrate ---------------------------------------------------------------------------------


def test_calibrate_numbers_are_plausible() -> None:
    c = calibrate("here", threads=1, quick=True)
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
