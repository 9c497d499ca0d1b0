"""The library API runs each command's flow on its own: spec, mask, prune with a report whose
numbers are checked against hand-computed costs and the written file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx_builders import Builder

import morphonnx
from morphonnx.prune import prune_model

# four filters of conv1: 0 and 2 strong, 1 and 3 nearly dead
W1 = (
    np.ones((4, 3, 3, 3), np.float32)
    * np.array([1.0, 1e-3, 1.0, 1e-3], np.float32)[:, None, None, None]
)
B1 = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
W2 = np.arange(20, dtype=np.float32).reshape(5, 4, 1, 1) / 10


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """x [1, 3, 8, 8] -> conv1 (4 filters, 3x3, same) -> Relu -> conv2 (5 filters, 1x1) -> y."""
    b = Builder(opset=13)
    x = b.input("x", [1, 3, 8, 8])
    c1 = b.node("Conv", [x, b.init("w1", W1), b.init("b1", B1)], kernel_shape=[3, 3], pads=[1] * 4)
    y = b.node("Conv", [b.relu(c1), b.init("w2", W2)], "y", kernel_shape=[1, 1])
    b.output(y)
    return b.save(tmp_path)


def _conv1_group(a: morphonnx.api.Analysis) -> str:
    return next(g.id for g in a.solution.groups if any(m.tensor == "w1" for m in g.members))


def test_mask_from_spec(model: Path) -> None:
    a = morphonnx.analyze_file(model)
    spec = morphonnx.make_spec(model)
    gid = _conv1_group(a)
    fixed = morphonnx.make_mask(a, spec, threshold=0.1, kind="group_lasso")
    auto = morphonnx.make_mask(a, spec, kind="group_lasso")
    assert fixed.keep[gid] == [True, False, True, False] == auto.keep[gid]
    assert not fixed.note and "widest gap" in auto.note
    assert 1e-3 < auto.threshold < 1.0


def test_prune_file_report(model: Path, tmp_path: Path) -> None:
    a = morphonnx.analyze_file(model)
    gid = _conv1_group(a)
    out, layers = tmp_path / "out.onnx", tmp_path / "layers.json"
    report = morphonnx.prune_file(model, {gid: [True, False, True, False]}, out, structure=layers)
    assert report.kept == {gid: 2}
    # by hand: conv1 keeps 2 filters of 3x3x3 on 8x8, conv2 reads 2 channels into 5 on 8x8
    macs = 2 * 64 * 27 + 5 * 64 * 2
    params = 2 * 27 + 2 + 5 * 2
    assert (report.measured.macs, report.measured.params) == (macs, params)
    assert (report.predicted.macs, report.predicted.params) == (macs, params)
    assert report.as_predicted
    assert report.verification is not None and report.verification.ok
    assert report.verification.tensors >= 3
    assert report.written == [out, layers]
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    np.testing.assert_array_equal(written["w1"], W1[[0, 2]])
    np.testing.assert_array_equal(written["w2"], W2[:, [0, 2]])
    doc = json.loads(layers.read_text())
    assert [(x["node"], x["out_channels"]) for x in doc["layers"]][0][1] == [4, 2]


def test_prune_leaves_the_analysis_whole(model: Path) -> None:
    a = morphonnx.analyze_file(model)
    before = a.graph.model.SerializeToString()
    pruned = prune_model(a, {_conv1_group(a): [True, False, True, False]})
    assert a.graph.model.SerializeToString() == before
    assert a.graph.value("w1").shape == (4, 3, 3, 3)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    assert shapes["w1"] == [2, 3, 3, 3]


def test_prune_file_refuses_a_wrong_mask(model: Path, tmp_path: Path) -> None:
    a = morphonnx.analyze_file(model)
    out = tmp_path / "out.onnx"
    with pytest.raises(morphonnx.MorphonnxError, match="has 4 channels, the mask lists 2"):
        morphonnx.prune_file(model, {_conv1_group(a): [True, False]}, out)
    assert not out.exists()
