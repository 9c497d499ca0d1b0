"""The ``morphonnx`` command line, end to end on real files.

Every command runs in-process through ``morphonnx.cli.main`` (fast, output captured) and a few
run as real subprocesses (``python -m morphonnx``) to check exit codes and that an error is one
line on stderr, without a traceback. Bad input for every command must fail with a one-line error
naming the file, leave no file at the output path, and leave an existing output untouched.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_runner import run
from onnx import TensorProto, helper, numpy_helper

from morphonnx.cli import main
from morphonnx.devices import BUILTIN
from morphonnx.formats import fingerprint

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "tiny_resnet.onnx"
BUILTIN_NAMES = {"K80", "P4", "T4", "P100", "V100", "TPUv2", "A100", "H100", "CPU"}

# fields the contract fixes, and the ones the implementation adds (documented in docs/formats.md)
CONTRACT = {
    "top": {"model", "totals", "ops", "groups"},
    "model": {"path", "fingerprint", "opset", "nodes"},
    "totals": {"macs", "flops", "params", "latency_s"},
    "op": {"name", "op_type", "macs", "flops", "params", "bytes", "latency_s"},
    "group": {"id", "channels", "prunable", "reason"},
}
EXTRA = {
    "top": set(),
    "model": {"inputs", "unsupported_ops", "shapes_unknown_from"},
    "totals": {"weight_bytes", "complete", "unknown_ops"},
    "op": {"bound"},
}
EXTRA["group"] = {"producers"}


def run_process(*argv: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "morphonnx", *[str(a) for a in argv]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(err: str, *names: object) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("morphonnx"), err
    for name in names:
        assert str(name) in lines[0], (name, err)


def plain_chain(path: Path, dims: list[int | str], *, names: list[str] | None = None) -> Path:
    """x[dims] -> Conv(4x3x3x3, pad 1) -> Relu -> Conv(2x4x1x1) -> Relu -> y, weights in
    initializers; ``names`` are the node names ("" = unnamed)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    names = names or ["c1", "r1", "c2", "r2"]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name=names[0], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"], name=names[1]),
        helper.make_node("Conv", ["b", "w2"], ["c"], name=names[2]),
        helper.make_node("Relu", ["c"], ["y"], name=names[3]),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def chain_macs(n: int, h: int, w: int) -> int:
    """By hand: conv1 4 outputs x 27 MACs per pixel, conv2 2 outputs x 4 MACs per pixel."""
    return n * h * w * (4 * 27 + 2 * 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled model with its spec and a mask; another architecture with its own; broken
    model files. Made once, read-only for the tests."""
    d = tmp_path_factory.mktemp("cli")
    f = {"model": d / "model.onnx", "spec": d / "spec.json", "mask": d / "mask.json"}
    shutil.copy(BUNDLED, f["model"])
    assert main(["spec", str(f["model"]), "-o", str(f["spec"])]) == 0
    mask_argv = ["mask", str(f["model"]), "--spec", str(f["spec"]), "--threshold", "0.9"]
    assert main([*mask_argv, "-o", str(f["mask"])]) == 0
    f["other"] = plain_chain(d / "other.onnx", [1, 3, 8, 8])
    f["other_spec"] = d / "other_spec.json"
    f["other_mask"] = d / "other_mask.json"
    assert main(["spec", str(f["other"]), "-o", str(f["other_spec"])]) == 0
    other_argv = ["mask", str(f["other"]), "--spec", str(f["other_spec"]), "--threshold", "0"]
    assert main([*other_argv, "-o", str(f["other_mask"])]) == 0
    f["garbage"] = d / "garbage.onnx"
    f["garbage"].write_text("this is not an ONNX model\n")
    f["truncated"] = d / "truncated.onnx"
    data = f["model"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["missing"] = d / "missing.onnx"
    f["bad_json"] = d / "bad.json"
    f["bad_json"].write_text('{"format": "morphonnx.spec", "version": 1, "groups": [')
    return f


def mask_variant(
    files: dict[str, Path], folder: Path, edit: Callable[[dict[str, Any]], None]
) -> Path:
    doc = json.loads(files["mask"].read_text())
    edit(doc)
    path = folder / "edited_mask.json"
    path.write_text(json.dumps(doc))
    return path


def analyze_json(capsys: pytest.CaptureFixture[str], tmp: Path, *argv: object) -> dict[str, Any]:
    out = tmp / f"analysis{len(list(tmp.glob('analysis*')))}.json"
    rc, _, err = run(capsys, "analyze", *argv, "--json", out)
    assert rc == 0, err
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- analyze


def test_analyze_json_follows_the_contract(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = analyze_json(capsys, tmp_path, files["model"], "--device", "V100", "--device", "t4")
    for key, part in (("top", doc), ("model", doc["model"]), ("totals", doc["totals"])):
        assert set(part) == CONTRACT[key] | EXTRA[key], key
    for op in doc["ops"]:
        assert set(op) == CONTRACT["op"] | EXTRA["op"]
    for g in doc["groups"]:
        assert set(g) == CONTRACT["group"] | EXTRA["group"]
        assert isinstance(g["id"], str) and isinstance(g["channels"], int)
        assert (g["reason"] is None) == g["prunable"]

    proto = onnx.load(files["model"])
    model = doc["model"]
    assert model["path"] == str(files["model"])
    assert model["fingerprint"] == fingerprint(proto)
    assert model["opset"] == 17
    assert model["nodes"] == len(proto.graph.node)

    # every node, in graph order, under its own name
    assert [o["name"] for o in doc["ops"]] == [n.name for n in proto.graph.node]
    assert [o["op_type"] for o in doc["ops"]] == [n.op_type for n in proto.graph.node]

    totals = doc["totals"]
    devices = ["V100", "T4"]
    assert list(totals["latency_s"]) == devices
    for op in doc["ops"]:
        assert op["flops"] == 2 * op["macs"]
        assert list(op["latency_s"]) == devices
        for name in devices:
            dev = BUILTIN[name]
            roofline = max(op["flops"] / dev.peak_flops, op["bytes"] / dev.mem_bandwidth)
            assert op["latency_s"][name] == pytest.approx(roofline, rel=1e-12)
        if op["op_type"] not in ("Conv", "Gemm", "MatMul", "ConvTranspose"):
            assert op["macs"] == 0
    assert totals["flops"] == 2 * totals["macs"]
    assert totals["macs"] == sum(o["macs"] for o in doc["ops"]) > 0
    assert totals["params"] == sum(o["params"] for o in doc["ops"])  # no shared weights here
    weights = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]
    assert totals["params"] == sum(int(np.prod(t.dims)) for t in weights)
    for name in devices:
        total = sum(o["latency_s"][name] for o in doc["ops"])
        assert totals["latency_s"][name] == pytest.approx(total, rel=1e-9)


def test_analyze_names_unnamed_nodes_and_counts_by_hand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = plain_chain(tmp_path / "unnamed.onnx", [1, 3, 8, 8], names=["", "act", "", "act"])
    doc = analyze_json(capsys, tmp_path, path)
    names = [o["name"] for o in doc["ops"]]
    assert [o["op_type"] for o in doc["ops"]] == ["Conv", "Relu", "Conv", "Relu"]
    assert len(set(names)) == 4 and all(names)
    assert names[1] == "act"  # a real name is kept; the duplicate and the unnamed get new ones
    assert names == ["Conv_0", "act", "Conv_2", "Relu_3"]
    assert [o["macs"] for o in doc["ops"]] == [64 * 4 * 27, 0, 64 * 2 * 4, 0]
    assert doc["totals"]["macs"] == chain_macs(1, 8, 8)
    assert names == [o["name"] for o in analyze_json(capsys, tmp_path, path)["ops"]]  # stable


def test_analyze_with_user_profiles(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    as_json = tmp_path / "fast.json"
    profile = {"name": "json-dev", "peak_flops": 2e12, "mem_bandwidth": 5e10}
    as_json.write_text(json.dumps({**profile, "bytes_per_element": 2}))
    as_toml = tmp_path / "slow.toml"
    as_toml.write_text('name = "toml-dev"\npeak_gflops = 100\nmem_bandwidth_gbps = 20\n')
    doc = analyze_json(capsys, tmp_path, files["model"], "--device", as_json, "--device", as_toml)
    assert list(doc["totals"]["latency_s"]) == ["json-dev", "toml-dev"]
    for op in doc["ops"]:
        fp16_bytes = op["bytes"] / 4 * 2  # float32 model, the profile fixes 2 bytes per element
        want = max(op["flops"] / 2e12, fp16_bytes / 5e10)
        assert op["latency_s"]["json-dev"] == pytest.approx(want, rel=1e-12)
        want = max(op["flops"] / 100e9, op["bytes"] / 20e9)
        assert op["latency_s"]["toml-dev"] == pytest.approx(want, rel=1e-12)


def test_analyze_unknown_device_and_bad_profile(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a.json"
    rc, _, err = run(capsys, "analyze", files["model"], "--device", "Z80", "--json", out)
    assert rc != 0
    assert_one_line_error(err, "Z80", "unknown device")
    assert not out.exists()
    profile = tmp_path / "broken.toml"
    profile.write_text('name = "x"\npeak_gflops = -1\nmem_bandwidth_gbps = 1\n')
    rc, _, err = run(capsys, "analyze", files["model"], "--device", profile, "--json", out)
    assert rc != 0
    assert_one_line_error(err, profile)
    assert not out.exists()


def test_analyze_top(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no truncated node names in the table
    doc = analyze_json(capsys, tmp_path, files["model"])
    ranked = sorted(doc["ops"], key=lambda o: o["latency_s"]["V100"], reverse=True)
    lat = [o["latency_s"]["V100"] for o in ranked]
    k = next(i for i in range(2, len(lat)) if lat[i - 1] > lat[i])  # no tie across the cut
    rc, out, err = run(capsys, "analyze", files["model"], "--top", k)
    assert rc == 0, err
    table = out[out.index(f"Top {k} layers") : out.index("Channel groups")]
    rows = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert rows == [op["name"] for op in ranked[:k]]
    rc, _, err = run(capsys, "analyze", files["model"], "--top", -1)
    assert rc != 0
    assert_one_line_error(err, "--top")


def test_analyze_dynamic_dims_need_input_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = plain_chain(tmp_path / "dynamic.onnx", ["N", 3, "H", "W"])
    out = tmp_path / "a.json"
    rc, _, err = run(capsys, "analyze", path, "--json", out)
    assert rc != 0
    assert_one_line_error(err, path, "'H'", "--input-shape")
    assert not out.exists()
    doc = analyze_json(capsys, tmp_path, path, "--input-shape", "x=2,3,16,12")
    assert doc["totals"]["macs"] == chain_macs(2, 16, 12)
    assert doc["model"]["inputs"] == {"x": [2, 3, 16, 12]}
    other = analyze_json(capsys, tmp_path, path, "--input-shape", "x=1,3,8,8")
    assert other["totals"]["macs"] == chain_macs(1, 8, 8)
    assert other["model"]["fingerprint"] == doc["model"]["fingerprint"]  # of the file, not shapes
    rc, _, err = run(capsys, "analyze", path, "--input-shape", "nope=1,3,8,8")
    assert rc != 0
    assert_one_line_error(err, "nope")
    rc, _, err = run(capsys, "analyze", path, "--input-shape", "x=1,3,8")
    assert rc != 0
    assert_one_line_error(err, "rank")
    rc, _, err = run(capsys, "analyze", path, "--input-shape", "x=1,a,8,8")
    assert rc == 2
    assert_one_line_error(err, "x=1,a,8,8")


def test_batch_multiplies_macs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = plain_chain(tmp_path / "batch.onnx", ["batch", 3, 8, 8])
    one = analyze_json(capsys, tmp_path, path)
    four = analyze_json(capsys, tmp_path, path, "--batch", 4)
    assert one["totals"]["macs"] == chain_macs(1, 8, 8)
    assert four["totals"]["macs"] == 4 * one["totals"]["macs"]
    assert four["totals"]["params"] == one["totals"]["params"]
    for a, b in zip(one["ops"], four["ops"], strict=True):
        assert b["macs"] == 4 * a["macs"]
    rc, _, err = run(capsys, "analyze", path, "--batch", 0)
    assert rc != 0
    assert_one_line_error(err, "--batch")


def test_batch_on_a_fixed_batch_model_says_it_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed = plain_chain(tmp_path / "fixed.onnx", [1, 3, 8, 8])
    rc, _, err = run(capsys, "analyze", fixed, "--batch", 4)
    assert rc == 0 and "--batch 4 changes nothing" in err and str(fixed) in err
    dynamic = plain_chain(tmp_path / "dynamic.onnx", ["batch", 3, 8, 8])
    rc, _, err = run(capsys, "analyze", dynamic, "--batch", 4)
    assert rc == 0 and err == ""


def test_batch_on_a_torch_export_with_dynamic_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    from torch_models import build_model, example_input, torch_macs_params

    from morphonnx.adapters.torch import export_onnx

    model, x = build_model("tiny_mobilenet_v2"), example_input("tiny_mobilenet_v2")
    path = tmp_path / "mobilenet.onnx"
    export_onnx(model, x, path, dynamic_batch=True)
    macs, _ = torch_macs_params(model, x)
    assert analyze_json(capsys, tmp_path, path)["totals"]["macs"] == macs
    assert analyze_json(capsys, tmp_path, path, "--batch", 4)["totals"]["macs"] == 4 * macs


# --------------------------------------------------------------------------- devices


def test_devices_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "devices")
    assert rc == 0
    for name in BUILTIN_NAMES:
        assert name in out
    rc, out, _ = run(capsys, "devices", "--json")
    assert rc == 0
    listed = json.loads(out)
    by_name = {d["name"]: d for d in listed}
    assert BUILTIN_NAMES <= set(by_name)
    assert [d["name"] for d in listed][:6] == ["K80", "P4", "T4", "P100", "V100", "TPUv2"]
    assert by_name["V100"]["peak_flops"] == 125e12 and by_name["V100"]["mem_bandwidth"] == 900e9
    for d in listed:
        assert d["peak_flops"] > 0 and d["mem_bandwidth"] > 0 and d["note"]


# --------------------------------------------------------------------------- bad input

Case = tuple[str, Callable[[dict[str, Path], Path], tuple[list[object], Path, object]]]


def _model_cases(cmd: str) -> list[Case]:
    def make(which: str) -> Callable[[dict[str, Path], Path], tuple[list[object], Path, object]]:
        def build(f: dict[str, Path], d: Path) -> tuple[list[object], Path, object]:
            model = f[which]
            if cmd == "analyze":
                out = d / "out.json"
                return ["analyze", model, "--json", out], out, model
            if cmd == "spec":
                out = d / "out.json"
                return ["spec", model, "-o", out], out, model
            if cmd == "mask":
                out = d / "out.json"
                return ["mask", model, "--spec", f["spec"], "--auto", "-o", out], out, model
            out = d / "out.onnx"
            return ["prune", model, "--mask", f["mask"], "-o", out], out, model

        return build

    return [(f"{cmd}-{w}", make(w)) for w in ("garbage", "truncated", "missing")]


def _mask_edit(edit: Callable[[dict[str, Any]], None], msg: str) -> Any:
    def build(f: dict[str, Path], d: Path) -> tuple[list[object], Path, object]:
        mask = mask_variant(f, d.parent, edit)
        out = d / "out.onnx"
        return ["prune", f["model"], "--mask", mask, "-o", out], out, f"{mask}: {msg}"

    return build


def _drop_one(doc: dict[str, Any]) -> None:
    gid = next(iter(doc["groups"]))
    doc["groups"][gid] = doc["groups"][gid][:-1]


def _keep_none(doc: dict[str, Any]) -> None:
    gid = next(iter(doc["groups"]))
    doc["groups"][gid] = [False] * len(doc["groups"][gid])


def _unprunable(doc: dict[str, Any]) -> None:
    doc["groups"]["g1"] = [True, False, True]  # g1: the 3 channels of the graph input


BAD_INPUT: list[Case] = [
    *_model_cases("analyze"),
    *_model_cases("spec"),
    *_model_cases("mask"),
    *_model_cases("prune"),
    (
        "analyze-json-is-input",
        lambda f, d: (["analyze", f["model"], "--json", f["model"]], f["model"], f["model"]),
    ),
    (
        "spec-output-is-input",
        lambda f, d: (["spec", f["model"], "-o", f["model"]], f["model"], f["model"]),
    ),
    (
        "spec-output-is-folder",
        lambda f, d: (["spec", f["model"], "-o", d], d / "never", d),
    ),
    (
        "spec-output-folder-missing",
        lambda f, d: (
            ["spec", f["model"], "-o", d / "no" / "s.json"],
            d / "no" / "s.json",
            d / "no",
        ),
    ),
    (
        "mask-malformed-spec",
        lambda f, d: (
            ["mask", f["model"], "--spec", f["bad_json"], "--auto", "-o", d / "m.json"],
            d / "m.json",
            f["bad_json"],
        ),
    ),
    (
        "mask-missing-spec",
        lambda f, d: (
            ["mask", f["model"], "--spec", d / "nope.json", "--auto", "-o", d / "m.json"],
            d / "m.json",
            d / "nope.json",
        ),
    ),
    (
        "mask-spec-of-other-model",
        lambda f, d: (
            [
                "mask",
                f["model"],
                "--spec",
                f["other_spec"],
                "--threshold",
                "0.1",
                "-o",
                d / "m.json",
            ],
            d / "m.json",
            f"{f['other_spec']}: spec was made for another model",
        ),
    ),
    (
        "mask-given-a-mask-as-spec",
        lambda f, d: (
            ["mask", f["model"], "--spec", f["mask"], "--auto", "-o", d / "m.json"],
            d / "m.json",
            f["mask"],
        ),
    ),
    (
        "mask-output-is-input",
        lambda f, d: (
            ["mask", f["model"], "--spec", f["spec"], "--auto", "-o", f["model"]],
            f["model"],
            f["model"],
        ),
    ),
    (
        "mask-output-is-spec",
        lambda f, d: (
            ["mask", f["model"], "--spec", f["spec"], "--auto", "-o", f["spec"]],
            f["spec"],
            f["spec"],
        ),
    ),
    (
        "mask-plot-is-input",
        lambda f, d: (
            [
                "mask",
                f["model"],
                "--spec",
                f["spec"],
                "--auto",
                "-o",
                d / "m.json",
                "--plot",
                f["model"],
            ],
            d / "m.json",
            f["model"],
        ),
    ),
    (
        "prune-malformed-mask",
        lambda f, d: (
            ["prune", f["model"], "--mask", f["bad_json"], "-o", d / "p.onnx"],
            d / "p.onnx",
            f["bad_json"],
        ),
    ),
    (
        "prune-missing-mask",
        lambda f, d: (
            ["prune", f["model"], "--mask", d / "nope.json", "-o", d / "p.onnx"],
            d / "p.onnx",
            d / "nope.json",
        ),
    ),
    (
        "prune-spec-as-mask",
        lambda f, d: (
            ["prune", f["model"], "--mask", f["spec"], "-o", d / "p.onnx"],
            d / "p.onnx",
            f["spec"],
        ),
    ),
    (
        "prune-mask-of-other-model",
        lambda f, d: (
            ["prune", f["model"], "--mask", f["other_mask"], "-o", d / "p.onnx"],
            d / "p.onnx",
            f"{f['other_mask']}: mask was made for another model",
        ),
    ),
    (
        "prune-unknown-group",
        _mask_edit(lambda m: m["groups"].update(g99=[True]), "unknown group 'g99'"),
    ),
    ("prune-wrong-length", _mask_edit(_drop_one, "group 'g0' has 16 channels, the mask lists 15")),
    ("prune-keeps-nothing", _mask_edit(_keep_none, "group 'g0' keeps no channel")),
    ("prune-unprunable-group", _mask_edit(_unprunable, "group 'g1' is not prunable (graph input")),
    (
        "prune-not-booleans",
        _mask_edit(lambda m: m["groups"].update(g0=[1] * 16), "group 'g0' must be a list"),
    ),
    (
        "prune-output-is-input",
        lambda f, d: (
            ["prune", f["model"], "--mask", f["mask"], "-o", f["model"]],
            f["model"],
            f["model"],
        ),
    ),
    (
        "prune-output-is-mask",
        lambda f, d: (
            ["prune", f["model"], "--mask", f["mask"], "-o", f["mask"]],
            f["mask"],
            f["mask"],
        ),
    ),
    (
        "prune-structure-is-input",
        lambda f, d: (
            [
                "prune",
                f["model"],
                "--mask",
                f["mask"],
                "-o",
                d / "p.onnx",
                "--structure",
                f["model"],
            ],
            d / "p.onnx",
            f["model"],
        ),
    ),
]


@pytest.mark.parametrize("case", [c for _, c in BAD_INPUT], ids=[n for n, _ in BAD_INPUT])
def test_bad_input_fails_cleanly(
    case: Callable[[dict[str, Path], Path], tuple[list[object], Path, object]],
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = {p: p.read_bytes() for p in files.values() if p.is_file()}
    for existing in (False, True):
        d = tmp_path / f"out{int(existing)}"
        d.mkdir()
        argv, out, named = case(files, d)
        if existing and out.parent == d and not out.is_dir():
            out.write_bytes(b"precious")
        rc, _, err = run(capsys, *argv)
        assert rc == 1, err
        assert_one_line_error(err, named)
        if out in before:
            continue  # the output named an input: checked below
        if existing and out.parent == d:
            assert out.read_bytes() == b"precious"
            assert [p.name for p in d.iterdir()] == [out.name]
        else:
            assert not out.exists()
            if d.exists():
                assert list(d.iterdir()) == []
    assert {p: p.read_bytes() for p in before} == before  # no input was touched


# --------------------------------------------------------------------------- subprocesses


def test_subprocess_exit_codes_and_one_line_errors(files: dict[str, Path], tmp_path: Path) -> None:
    ok = run_process("analyze", files["model"], "--top", "3", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "Totals" in ok.stdout and "Top 3 layers" in ok.stdout
    assert ok.stderr == ""

    out = tmp_path / "p.onnx"
    failures = [
        (["analyze", files["missing"]], files["missing"]),
        (["spec", files["truncated"], "-o", tmp_path / "s.json"], files["truncated"]),
        (["analyze", files["model"], "--device", "NOPE"], "NOPE"),
        (["prune", files["model"], "--mask", files["other_mask"], "-o", out], files["other_mask"]),
    ]
    for argv, named in failures:
        proc = run_process(*argv, cwd=tmp_path)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert_one_line_error(proc.stderr, named)
    assert not out.exists() and not (tmp_path / "s.json").exists()

    usage = run_process("spec", files["model"], cwd=tmp_path)  # -o missing
    assert usage.returncode == 2
    assert_one_line_error(usage.stderr, "-o")
    nothing = run_process(cwd=tmp_path)
    assert nothing.returncode == 2
    assert_one_line_error(nothing.stderr)


# --------------------------------------------------------------------------- prune end to end


def _member_group(spec: dict[str, Any], tensor: str, axis: int) -> dict[str, Any] | None:
    for g in spec["groups"]:
        if any(m["tensor"] == tensor and m["axis"] == axis for m in g["members"]):
            return g
    return None


def test_prune_end_to_end(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, layers_json = tmp_path / "pruned.onnx", tmp_path / "structure.json"
    argv = ["prune", files["model"], "--mask", files["mask"], "-o", out, "--structure", layers_json]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    assert "verification passed" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx", "structure.json"]

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert sess.run(None, {"input": x})[0].shape == (1, 10)

    spec = json.loads(files["spec"].read_text())
    mask = json.loads(files["mask"].read_text())["groups"]
    assert any(not all(v) for v in mask.values())  # the mask does remove channels

    def kept(g: dict[str, Any] | None, full: int) -> int:
        if g is None:
            return full
        return sum(mask[g["id"]]) if g["id"] in mask else g["channels"]

    structure = json.loads(layers_json.read_text())
    assert structure["format"] == "morphonnx.structure" and structure["version"] == 1
    original = onnx.load(files["model"])
    weighted = [n.name for n in original.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [layer["node"] for layer in structure["layers"]] == weighted
    pruned_shapes = {t.name: list(t.dims) for t in onnx.load(out).graph.initializer}
    original_shapes = {t.name: list(t.dims) for t in original.graph.initializer}
    for layer in structure["layers"]:
        w = layer["weight"]
        cout, cin = original_shapes[w][:2]  # Conv [out, in, k, k]; Gemm here has transB=1
        assert layer["out_channels"] == [cout, kept(_member_group(spec, w, 0), cout)]
        assert layer["in_channels"] == [cin, kept(_member_group(spec, w, 1), cin)]
        assert pruned_shapes[w][:2] == [layer["out_channels"][1], layer["in_channels"][1]]
        assert layer["depthwise"] is False


def test_prune_no_verify_and_keep_all(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fast.onnx"
    rc, stdout, err = run(
        capsys, "prune", files["model"], "--mask", files["mask"], "-o", out, "--no-verify"
    )
    assert rc == 0, err
    assert "verification" not in stdout
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])

    keep_all = tmp_path / "all.json"
    doc = json.loads(files["mask"].read_text())
    doc["groups"] = {}
    keep_all.write_text(json.dumps(doc))
    same = tmp_path / "same.onnx"
    rc, stdout, err = run(capsys, "prune", files["model"], "--mask", keep_all, "-o", same)
    assert rc == 0, err
    a = analyze_json(capsys, tmp_path, files["model"])["totals"]
    b = analyze_json(capsys, tmp_path, same)["totals"]
    assert (a["macs"], a["params"]) == (b["macs"], b["params"])


def test_prune_model_with_external_data(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(files["model"])
    onnx.save_model(
        model,
        src / "ext.onnx",
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    out = tmp_path / "pruned.onnx"
    rc, _, err = run(capsys, "prune", src / "ext.onnx", "--mask", files["mask"], "-o", out)
    assert rc == 0, err
    inline = tmp_path / "inline.onnx"
    assert run(capsys, "prune", files["model"], "--mask", files["mask"], "-o", inline)[0] == 0
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    y1 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    y2 = ort.InferenceSession(str(inline), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    np.testing.assert_allclose(y1[0], y2[0], rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(y1[0].sum()))


def test_analyze_lists_ops_without_a_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A custom-domain op and a standard op missing from the op registry are named, with counts."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Foo", ["c"], ["f"], domain="com.example"),
        helper.make_node("TopK", ["c", "k"], ["v", "i"], axis=1),
    ]
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 4, 4, 4]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
        ],
        [w, k],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    doc = analyze_json(capsys, tmp_path, path)
    assert doc["model"]["unsupported_ops"] == {"com.example.Foo": 1, "TopK": 1}
    rc, out, _ = run(capsys, "analyze", path)
    assert rc == 0 and "ops without a channel rule" in out and "com.example.Foo x1" in out
