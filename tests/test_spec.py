"""``morphonnx spec``: the group spec adapters train with.

Determinism, the fingerprint (weights never matter, structure always does), the members of a
conv-bn-conv chain, and the cost terms checked against MACs counted by hand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_runner import run
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "models" / "tiny_resnet.onnx"


def make_spec(capsys: pytest.CaptureFixture[str], model: Path, out: Path) -> dict[str, Any]:
    rc, _, err = run(capsys, "spec", model, "-o", out)
    assert rc == 0, err
    return json.loads(out.read_text())


def group_with(spec: dict[str, Any], tensor: str, axis: int) -> dict[str, Any]:
    return next(
        g
        for g in spec["groups"]
        if any(m["tensor"] == tensor and m["axis"] == axis for m in g["members"])
    )


def alive_of(side: dict[str, Any], alive: dict[str, int]) -> int:
    """``A`` of one side of a cost term: static + sum(per_channel * alive(group))."""
    return side["static"] + sum(e["per_channel"] * alive[e["group"]] for e in side["groups"])


def term_flops(spec: dict[str, Any], alive: dict[str, int]) -> float:
    total = 0.0
    for t in spec["costs"]:
        a_in, a_out = alive_of(t["inputs"], alive), alive_of(t["outputs"], alive)
        total += t["flop_coeff"] * (a_out if t["kind"] == "depthwise" else a_in * a_out)
    return total


# --------------------------------------------------------------------------- format, determinism


def test_spec_is_deterministic_and_well_formed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(BUNDLED, model)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    rc, out, err = run(capsys, "spec", model, "-o", first)
    assert rc == 0, err
    assert f"wrote {first}" in out
    assert run(capsys, "spec", model, "-o", second)[0] == 0
    assert first.read_bytes() == second.read_bytes()

    spec = json.loads(first.read_text())
    assert spec["format"] == "morphonnx.spec" and spec["version"] == 1
    assert spec["model"]["path"] == str(model)
    analysis = tmp_path / "analysis.json"
    assert run(capsys, "analyze", model, "--json", analysis)[0] == 0
    report = json.loads(analysis.read_text())
    assert spec["model"]["fingerprint"] == report["model"]["fingerprint"]
    assert [(g["id"], g["channels"], g["prunable"], g["reason"]) for g in spec["groups"]] == [
        (g["id"], g["channels"], g["prunable"], g["reason"]) for g in report["groups"]
    ]
    assert [g["id"] for g in spec["groups"]] == [f"g{i}" for i in range(len(spec["groups"]))]

    shapes = {t.name: list(t.dims) for t in onnx.load(model).graph.initializer}
    for g in spec["groups"]:
        assert {"id", "channels", "prunable", "reason", "members", "regularize"} <= set(g)
        assert g["members"], g["id"]
        for m in g["members"]:
            assert {"tensor", "axis", "positions"} <= set(m)
            assert len(m["positions"]) == g["channels"]
            dim = shapes[m["tensor"]][m["axis"]]
            flat = [i for p in m["positions"] for i in p]
            assert len(set(flat)) == len(flat) and all(0 <= i < dim for i in flat)
        for entry in g["regularize"]["gammas"] + g["regularize"]["weights"]:
            assert entry in [
                {k: m[k] for k in ("tensor", "axis", "positions")} for m in g["members"]
            ]
    assert spec["totals"]["macs"] == report["totals"]["macs"]


def test_malformed_spec_with_the_right_fingerprint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(BUNDLED, model)
    spec = make_spec(capsys, model, tmp_path / "spec.json")
    for i, edit in enumerate(
        [
            lambda s: s["groups"][0].pop("regularize"),
            lambda s: s["groups"][0]["regularize"]["gammas"][0].update(positions=[[0]]),
            lambda s: s["groups"][0]["regularize"]["weights"][0].update(positions=[[9999]] * 16),
            lambda s: s["groups"].append("g7"),
        ]
    ):
        broken = json.loads(json.dumps(spec))
        edit(broken)
        path = tmp_path / f"broken{i}.json"
        path.write_text(json.dumps(broken))
        out = tmp_path / f"mask{i}.json"
        rc, _, err = run(capsys, "mask", model, "--spec", path, "--auto", "-o", out)
        assert rc == 1, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "spec" in err and (str(path) in err or str(model) in err), err
        assert not out.exists()


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_structure_not_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    from torch_models import TinyResNet, build_model, example_input, randomize_bn

    from morphonnx.adapters.torch import export_onnx

    x = example_input("tiny_resnet")
    before, after, narrow = tmp_path / "before.onnx", tmp_path / "after.onnx", tmp_path / "w4.onnx"
    export_onnx(build_model("tiny_resnet", seed=0), x, before)
    export_onnx(build_model("tiny_resnet", seed=1), x, after)  # "retrained": other weights
    export_onnx(randomize_bn(TinyResNet(width=4)).eval(), x, narrow)
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(before).graph.initializer}
    trained = {t.name: numpy_helper.to_array(t) for t in onnx.load(after).graph.initializer}
    assert init.keys() == trained.keys()
    assert not np.array_equal(init["conv1.weight"], trained["conv1.weight"])

    spec_before = make_spec(capsys, before, tmp_path / "before.json")
    spec_after = make_spec(capsys, after, tmp_path / "after.json")
    spec_narrow = make_spec(capsys, narrow, tmp_path / "narrow.json")
    assert spec_before["model"]["fingerprint"] == spec_after["model"]["fingerprint"]
    assert spec_before["groups"] == spec_after["groups"]
    assert spec_before["costs"] == spec_after["costs"]
    assert spec_narrow["model"]["fingerprint"] != spec_before["model"]["fingerprint"]

    # the normal workflow: spec before training, mask and prune the export after training
    mask = tmp_path / "mask.json"
    argv = ["mask", after, "--spec", tmp_path / "before.json", "--threshold", "0.9", "-o", mask]
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    assert json.loads(mask.read_text())["model_fingerprint"] == spec_after["model"]["fingerprint"]
    assert run(capsys, "prune", after, "--mask", mask, "-o", tmp_path / "small.onnx")[0] == 0

    # another architecture is refused, naming the spec
    refused = tmp_path / "refused.json"
    argv = ["mask", narrow, "--spec", tmp_path / "before.json", "--threshold", "0.9", "-o", refused]
    rc, _, err = run(capsys, *argv)
    assert rc == 1
    assert f"{tmp_path / 'before.json'}: spec was made for another model" in err
    assert not refused.exists()
    rc, _, err = run(capsys, "prune", narrow, "--mask", mask, "-o", tmp_path / "no.onnx")
    assert rc == 1 and f"{mask}: mask was made for another model" in err
    assert not (tmp_path / "no.onnx").exists()


# --------------------------------------------------------------------------- members


def test_conv_bn_conv_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch_models import randomize_bn

    from morphonnx.adapters.torch import export_onnx

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, bias=False),
    )
    path = tmp_path / "cbc.onnx"
    export_onnx(randomize_bn(net).eval(), torch.randn(1, 3, 8, 8), path)
    spec = make_spec(capsys, path, tmp_path / "spec.json")
    g = group_with(spec, "0.weight", 0)
    assert g["channels"] == 8 and g["prunable"] and g["reason"] is None
    members = {(m["tensor"], m["axis"]): m for m in g["members"]}
    assert set(members) == {
        ("0.weight", 0),
        ("0.bias", 0),
        ("1.weight", 0),
        ("1.bias", 0),
        ("1.running_mean", 0),
        ("1.running_var", 0),
        ("3.weight", 1),
    }
    assert members[("0.weight", 0)]["role"] == "producer"
    assert members[("1.weight", 0)]["role"] == "gamma"
    assert members[("3.weight", 1)]["role"] == "consumer"
    for m in g["members"]:
        assert m["positions"] == [[k] for k in range(8)]
    assert [s["tensor"] for s in g["regularize"]["gammas"]] == ["1.weight"]
    assert [s["tensor"] for s in g["regularize"]["weights"]] == ["0.weight"]
    out_group = group_with(spec, "3.weight", 0)  # feeds the graph output
    assert not out_group["prunable"] and "output" in out_group["reason"]


# --------------------------------------------------------------------------- cost terms


def chain_model(path: Path) -> Path:
    """x[1,3,8,8] -> Conv 3->8 (3x3, bias) -> Relu -> depthwise 3x3 (group 8) -> Relu
    -> Conv 8->6 (1x1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 6->5 (transB) -> y."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [
        init("w1", 8, 3, 3, 3),
        init("b1", 8),
        init("wd", 8, 1, 3, 3),
        init("w3", 6, 8, 1, 1),
        init("w4", 5, 6),
        init("b4", 5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["cd"], pads=[1] * 4, group=8),
        helper.make_node("Relu", ["cd"], ["rd"]),
        helper.make_node("Conv", ["rd", "w3"], ["c3"]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def hand_macs(k1: int, k3: int) -> int:
    """MACs of ``chain_model`` with ``k1`` of conv1's 8 and ``k3`` of conv3's 6 channels alive."""
    pixels = 8 * 8
    return pixels * k1 * 27 + pixels * k1 * 9 + pixels * k3 * k1 + 5 * k3


def test_cost_terms_reproduce_macs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = chain_model(tmp_path / "chain.onnx")
    spec = make_spec(capsys, model, tmp_path / "spec.json")
    analysis = tmp_path / "a.json"
    assert run(capsys, "analyze", model, "--json", analysis)[0] == 0
    report = json.loads(analysis.read_text())
    costed = [o for o in report["ops"] if o["op_type"] in ("Conv", "Gemm")]
    assert sum(o["macs"] for o in costed) == report["totals"]["macs"] == hand_macs(8, 6)

    assert [t["op_type"] for t in spec["costs"]] == ["Conv", "Conv", "Conv", "Gemm"]
    assert [t["kind"] for t in spec["costs"]] == ["pair", "depthwise", "pair", "pair"]
    assert [t["op"] for t in spec["costs"]] == [o["name"] for o in costed]
    for t, op in zip(spec["costs"], costed, strict=True):  # each term alone, everything alive
        alone = {**spec, "costs": [t]}
        full = {g["id"]: g["channels"] for g in spec["groups"]}
        assert term_flops(alone, full) == pytest.approx(2 * op["macs"], rel=1e-12)

    g1, g3 = group_with(spec, "w1", 0), group_with(spec, "w3", 0)
    assert g1["prunable"] and g3["prunable"] and g1["channels"] == 8 and g3["channels"] == 6
    assert group_with(spec, "wd", 0)["id"] == g1["id"]  # depthwise keeps its input's channels
    alive = {g["id"]: g["channels"] for g in spec["groups"]}
    assert term_flops(spec, alive) == pytest.approx(2 * hand_macs(8, 6), rel=1e-12)

    # with channels removed: the same formula, the hand count and the pruned model agree
    keep1 = [True, False, True, True, False, False, True, False]
    keep3 = [False, True, True, False, False, True]
    mask = tmp_path / "mask.json"
    doc = {
        "format": "morphonnx.mask",
        "version": 1,
        "model_fingerprint": spec["model"]["fingerprint"],
        "groups": {g1["id"]: keep1, g3["id"]: keep3},
    }
    mask.write_text(json.dumps(doc))
    alive.update({g1["id"]: sum(keep1), g3["id"]: sum(keep3)})
    want = 2 * hand_macs(sum(keep1), sum(keep3))
    assert term_flops(spec, alive) == pytest.approx(want, rel=1e-12)
    pruned = tmp_path / "pruned.onnx"
    rc, _, err = run(capsys, "prune", model, "--mask", mask, "-o", pruned)
    assert rc == 0, err
    assert run(capsys, "analyze", pruned, "--json", analysis)[0] == 0
    assert json.loads(analysis.read_text())["totals"]["flops"] == want


def test_cost_terms_on_a_residual_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All alive, the terms sum to the model's FLOPs on the bundled ResNet too."""
    spec = make_spec(capsys, BUNDLED, tmp_path / "spec.json")
    alive = {g["id"]: g["channels"] for g in spec["groups"]}
    assert term_flops(spec, alive) == pytest.approx(spec["totals"]["flops"], rel=1e-12)
    for t in spec["costs"]:
        assert {"op", "op_type", "kind", "inputs", "outputs", "flop_coeff", "size_coeff"} <= set(t)
        for side in (t["inputs"], t["outputs"]):
            for e in side["groups"]:
                assert next(g for g in spec["groups"] if g["id"] == e["group"])["prunable"]
