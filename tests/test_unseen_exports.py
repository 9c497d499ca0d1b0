"""Patterns of exports nobody here wrote (tf2onnx, keras2onnx, paddle2onnx, jax2tf): never silently
wrong, and a group called prunable prunes and verifies.

Each pattern is built in code (``pattern_builders``) in several variants (opsets, static and
dynamic shapes, fused and unfused forms), analyzed, its MACs checked against an independent count
(shapes measured in onnxruntime), pruned with random masks and verified tensor by tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from independent_count import count_macs_params
from onnx import helper, numpy_helper
from onnx_builders import Builder
from pattern_builders import (
    computed_shape_net,
    convnext_block,
    data_dependent_pad_net,
    int32_slice_net,
    reshape_head,
    tf_same_conv_net,
)
from test_prune import prune_and_check, random_keep

from morphonnx.analysis import Analysis
from morphonnx.api import analyze_file as analyze
from morphonnx.cli import main
from morphonnx.fold import FOLDS
from morphonnx.graph import Node
from morphonnx.prune import check_pruned, prune_model, save_model
from morphonnx.verify import verify


def feeds_for(a: Analysis) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        n: rng.standard_normal(a.graph.shape(n) or ()).astype(np.float32) for n in a.graph.inputs
    }


def independent_macs(path: Path, a: Analysis) -> int:
    return int(count_macs_params(onnx.load(str(path)), feeds=feeds_for(a))["macs"])


def prune_random(path: Path, a: Analysis, tmp: Path, seeds: tuple[int, ...] = (0,)) -> None:
    """Random masks (each prunable group keeps at least one channel): checker and verification."""
    assert any(g.prunable for g in a.solution.groups)
    for seed in seeds:
        keep = random_keep(a, np.random.default_rng(seed))
        prune_and_check(path, keep, tmp / f"pruned{seed}.onnx")


def groups_of(a: Analysis, weight: str, axis: int) -> list[bool]:
    return [
        g.prunable
        for g in a.solution.groups
        if any(m.tensor == weight and m.axis == axis for m in g.members)
    ]


def every_other_mask(report: dict[str, Any], path: Path) -> None:
    """A mask for ``report`` (a spec or analyze JSON) keeping every other channel of each
    prunable group."""
    groups = {
        g["id"]: [i % 2 == 0 for i in range(g["channels"])]
        for g in report["groups"]
        if g["prunable"]
    }
    mask = {"format": "morphonnx.mask", "version": 1, "groups": groups}
    mask["model_fingerprint"] = report["model"]["fingerprint"]
    path.write_text(json.dumps(mask))


# --- 1. shapes computed at run time are evaluated, and what stays unknown is said ----------------


@pytest.mark.parametrize("form", ["float", "int", "where"])
@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("dynamic,opset", [(False, 12), (True, 13), (True, 18)])
def test_tf_same_padding_is_evaluated(
    form: str, nhwc: bool, dynamic: bool, opset: int, tmp_path: Path
) -> None:
    """Pads computed from ``Shape`` (Div/Ceil/Max or Where/Mod arithmetic, float or int): every
    shape known, MACs exact, the convs' groups prunable through the Pads (their channel entries
    are 0 whatever the input size), pruning verifies."""
    path = tf_same_conv_net(opset, dynamic, form, nhwc).save(tmp_path)
    shapes = {"x": [1, 16, 12, 3] if nhwc else [1, 3, 16, 12]} if dynamic else None
    a = analyze(path, input_shapes=shapes)
    assert a.totals.complete and a.totals.unknown == []
    # by hand: 16x12 -> same/2 -> 8x6 -> same/2 -> 4x3 -> same/1 -> 4x3
    by_hand = 8 * 6 * 8 * 27 + 4 * 3 * 6 * 72 + 4 * 3 * 6 * 54 + 6 * 4
    assert a.totals.macs == by_hand
    if not dynamic:
        assert a.totals.macs == independent_macs(path, a)
    assert groups_of(a, "conv1.weight", 0) == [True]
    assert groups_of(a, "conv2.weight", 0) == [True]
    if not dynamic:  # (verification feeds the analyzed shapes; dynamic inputs need shapes given)
        prune_random(path, a, tmp_path)


def test_dynamic_same_padding_prunes_at_given_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI end to end on a dynamic-shape export: analyze, spec, mask-free prune with
    ``--input-shape``: verification passes."""
    path = tf_same_conv_net(13, True, "float", False).save(tmp_path)
    spec = tmp_path / "spec.json"
    assert main(["spec", str(path), "--input-shape", "x=1,3,16,12", "-o", str(spec)]) == 0
    groups = json.loads(spec.read_text())
    assert groups["totals"]["complete"] is True
    every_other_mask(groups, tmp_path / "mask.json")
    out = tmp_path / "pruned.onnx"
    argv = ["prune", str(path), "--input-shape", "x=1,3,16,12", "--mask"]
    assert main([*argv, str(tmp_path / "mask.json"), "-o", str(out)]) == 0
    assert "verification passed" in capsys.readouterr().out


def test_unknown_shapes_are_said_never_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Pad by an amount computed from the data: the shapes after it are unknown. The MACs of
    the convs after it are unknown (null, ``?``), never 0; totals say they are incomplete, name
    the ops and the node from which shapes are unknown, on the terminal and in the JSON."""
    path = data_dependent_pad_net().save(tmp_path)
    out = tmp_path / "report.json"
    assert main(["analyze", str(path), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    t = report["totals"]
    assert t["complete"] is False
    assert t["macs"] is None and t["flops"] is None and t["latency_s"] == {"V100": None}
    unknown = {u["name"] for u in t["unknown_ops"]}
    assert {"conv2", "conv3"} <= unknown and "conv1" not in unknown
    pad = next(o["name"] for o in report["ops"] if o["op_type"] == "Pad")
    assert report["model"]["shapes_unknown_from"] == [pad]
    ops = {o["name"]: o for o in report["ops"]}
    assert ops["conv1"]["macs"] == 1 * 4 * 8 * 8 * 27  # known before the Pad: exact
    assert ops["conv2"]["macs"] is None and ops["conv2"]["bytes"] is None
    assert ops["conv2"]["latency_s"] == {"V100": None}
    assert f"shapes unknown from node `{pad}` (Pad)" in captured.err
    assert "totals are incomplete" in captured.err
    assert "│ MACs         │       ? │" in captured.out
    spec = tmp_path / "spec.json"
    assert main(["spec", str(path), "-o", str(spec)]) == 0
    assert "shapes unknown" in capsys.readouterr().err
    doc = json.loads(spec.read_text())
    assert doc["totals"]["complete"] is False and doc["totals"]["macs"] is None
    assert {"conv2", "conv3"} <= set(doc["totals"]["unknown_ops"])


FOLD_CASES = [
    ("Ceil", [np.array([1.2, -1.5, 3.0], np.float32)], {}),
    ("Floor", [np.array([1.7, -1.5], np.float32)], {}),
    ("Round", [np.array([0.5, 1.5, -2.5, 2.6], np.float32)], {}),
    ("Relu", [np.array([-3, 0, 5], np.int64)], {}),
    ("Max", [np.array([1, 7, -2], np.int64), np.array([0], np.int64)], {}),
    ("Min", [np.array([1, 7], np.int64), np.array([3, 2], np.int64), np.array([5], np.int64)], {}),
    ("Mod", [np.array([7, -7, 7], np.int64), np.array([2, 2, -3], np.int64)], {}),
    ("Mod", [np.array([7, -7], np.int64), np.array([2, 2], np.int64)], {"fmod": 1}),
    ("Equal", [np.array([1, 2], np.int64), np.array([1, 3], np.int64)], {}),
    ("Less", [np.array([1, 2], np.int64), np.array([2, 2], np.int64)], {}),
    ("GreaterOrEqual", [np.array([1, 2], np.int64), np.array([2, 2], np.int64)], {}),
    ("Not", [np.array([True, False])], {}),
    ("And", [np.array([True, False]), np.array([True, True])], {}),
    ("Where", [np.array([True, False]), np.array([1, 2], np.int64), np.array([9], np.int64)], {}),
    ("ReduceProd", [np.array([[2, 3], [4, 5]], np.int64)], {"keepdims": 1}),
    ("ReduceSum", [np.array([[2, 3], [4, 5]], np.int64), np.array([1], np.int64)], {}),
    ("ReduceMax", [np.array([[2, 3], [4, 5]], np.int64), np.array([0], np.int64)], {"keepdims": 0}),
    ("Range", [np.array(2, np.int64), np.array(11, np.int64), np.array(3, np.int64)], {}),
    ("Div", [np.array([7, -7], np.int64), np.array([2, 2], np.int64)], {}),
]


@pytest.mark.parametrize("op,inputs,attrs", FOLD_CASES)
def test_shape_arithmetic_folds_like_onnxruntime(
    op: str, inputs: list[np.ndarray], attrs: dict[str, int], tmp_path: Path
) -> None:
    """Each op the shape evaluator knows gives onnxruntime's answer (opset 18)."""
    names = [f"in{i}" for i in range(len(inputs))]
    ours = FOLDS[op](Node(0, "n", op, "", names, ["y"], attrs), inputs)
    node = helper.make_node(op, names, ["y"], **attrs)
    elem = helper.np_dtype_to_tensor_dtype(ours.dtype)  # onnxruntime refuses a wrong dtype
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("y", elem, None)],
        initializer=[numpy_helper.from_array(v, n) for n, v in zip(names, inputs, strict=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {})[0]
    assert ours.dtype == expected.dtype
    np.testing.assert_array_equal(ours, expected)


# --- 2. a group called prunable prunes ----------------------------------------------------------


@pytest.mark.parametrize(
    "opset,fused,dynamic,tensordot",
    [
        (17, True, False, False),
        (13, False, True, False),
        (20, True, False, False),
        (18, False, False, True),
        (13, False, True, True),
        (17, True, False, True),
    ],
)
def test_convnext_hidden_width_prunes(
    opset: int, fused: bool, dynamic: bool, tensordot: bool, tmp_path: Path
) -> None:
    """The channels-last block: the hidden width (pw1's outputs, pw2's inputs) is one prunable
    group, also when the Dense layers are keras Tensordots whose run-time Reshape target holds
    the width as a constant (the rewrite corrects it); the residual width stays stopped by the
    LayerNorm. MACs exact, random masks verify."""
    path = convnext_block(opset, dynamic, fused, tensordot=tensordot).save(tmp_path)
    shapes = {"x": [2, 3, 9, 9]} if dynamic else None
    a = analyze(path, input_shapes=shapes)
    assert a.totals.complete
    assert groups_of(a, "pw1.weight", 1) == [True]
    assert groups_of(a, "pw2.weight", 0) == [True]
    assert groups_of(a, "stem.weight", 0) == [False]
    hidden = next(g for g in a.solution.groups if g.prunable)
    assert hidden.channels == 32
    if not dynamic:
        assert a.totals.macs == independent_macs(path, a)
        prune_random(path, a, tmp_path)


@pytest.mark.parametrize(
    "target,form",
    [
        ([1, 6], "initializer"),
        ([1, 6], "constant_node"),
        ([-1, 6], "initializer"),
        ([0, 6], "constant_node"),
        ([1, -1], "initializer"),
        ([1, 6], "computed"),
    ],
)
def test_classifier_head_reshape_target_follows(
    target: list[int], form: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``Reshape(GlobalAveragePool(x), [1, C])`` (paddle2onnx) in every spelling of the target,
    the batch read at run time included: the head group prunes and verifies."""
    path = reshape_head(13, target, form).save(tmp_path)
    shapes = {"x": [1, 3, 8, 8]} if form == "computed" else None
    a = analyze(path, input_shapes=shapes)
    assert groups_of(a, "conv.weight", 0) == [True]
    if form != "computed":
        prune_random(path, a, tmp_path)
        return
    keep = random_keep(a, np.random.default_rng(3))
    mask = tmp_path / "mask.json"
    doc = {"format": "morphonnx.mask", "version": 1, "model_fingerprint": a.fingerprint}
    mask.write_text(json.dumps({**doc, "groups": keep}))
    out = tmp_path / "pruned.onnx"
    argv = ["prune", str(path), "--input-shape", "x=1,3,8,8", "--mask", str(mask), "-o", str(out)]
    assert main(argv) == 0
    assert "verification passed" in capsys.readouterr().out


def test_onnxruntime_failure_is_a_verification_failure(tmp_path: Path) -> None:
    """A pruned model onnxruntime cannot run (a Reshape target left wrong, by hand here) is a
    verification failure that names the node, not an exception."""
    path = reshape_head(13, [1, 6], "initializer").save(tmp_path)
    a = analyze(path)
    keep = random_keep(a, np.random.default_rng(0))
    pruned = prune_model(a, keep)
    head = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    bad = numpy_helper.from_array(np.array([1, 999], np.int64), "bad_target")
    pruned.graph.initializer.append(bad)
    head.input[1] = "bad_target"
    v = verify(analyze(path), keep, pruned)
    assert not v.ok and len(v.failures) == 1
    named = re.search(r"at node `([^`]+)`", v.failures[0])
    assert named is not None and named.group(1) in {n.name for n in pruned.graph.node}
    assert "onnxruntime fails on the pruned model" in v.failures[0]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("steps,opset", [(False, 12), (True, 13), (True, 18)])
def test_slice_bounds_keep_their_dtype(
    dtype: type, steps: bool, opset: int, tmp_path: Path
) -> None:
    """jax2tf writes int32 Slice bounds: the rewritten bounds keep each input's dtype, so the
    pruned model passes the checker and verifies."""
    path = int32_slice_net(opset, dtype, steps).save(tmp_path)
    a = analyze(path)
    assert groups_of(a, "conv1.weight", 0) == [True, True]  # the two halves around the Slice
    keep = random_keep(a, np.random.default_rng(0))
    prune_and_check(path, keep, tmp_path / "pruned.onnx")
    pruned = onnx.load(str(tmp_path / "pruned.onnx"))
    inits = {t.name: t for t in pruned.graph.initializer}
    want = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for n in pruned.graph.node:
        if n.op_type == "Slice":
            assert {inits[t].data_type for t in n.input[1:] if t} == {want}


def test_self_check_reports_a_group_whose_rewrite_fails(tmp_path: Path) -> None:
    """A Resize to run-time sizes holding the channel count as a constant: no rewrite changes
    them. Without the dry run the group is called prunable and prune fails; with it the group
    is unprunable with the reason, and the other group stays prunable and prunes."""
    path = computed_shape_net("Resize").save(tmp_path)
    unchecked = analyze(path, check_rewrites=False)
    assert groups_of(unchecked, "conv1.weight", 0) == [True]
    keep = {
        g.id: [i != 0 for i in range(g.channels)] for g in unchecked.solution.groups if g.prunable
    }
    pruned = prune_model(unchecked, keep)  # passes the checker (the shape is run-time) ...
    save_model(pruned, tmp_path / "bad.onnx", path)
    check_pruned(tmp_path / "bad.onnx", "bad.onnx")
    v = verify(analyze(path, check_rewrites=False), keep, pruned)  # ... onnxruntime fails
    assert not v.ok and "node `conv2`" in v.failures[0]  # fed the channels resized back to 6

    a = analyze(path)
    bad = next(g for g in a.solution.groups if any(m.tensor == "conv1.weight" for m in g.members))
    assert not bad.prunable
    assert "dry run of its rewrite fails" in (bad.reason or "")
    assert "Resize" in (bad.reason or "")
    assert groups_of(a, "conv2.weight", 0) == [True]
    prune_random(path, a, tmp_path)


def test_expand_to_a_run_time_shape_holding_the_channel_count(tmp_path: Path) -> None:
    """The same shape in an Expand (torch's ``expand(b, h, r, n, d)``) is rewritten as a
    Reshape target is: the constant count gets the pruned one, the batch still read at run
    time. Both groups prune and verify."""
    path = computed_shape_net("Expand").save(tmp_path)
    a = analyze(path)
    assert groups_of(a, "conv1.weight", 0) == [True] and groups_of(a, "conv2.weight", 0) == [True]
    prune_random(path, a, tmp_path, seeds=(0, 1))


def test_self_check_keeps_every_group_of_a_clean_model(tmp_path: Path) -> None:
    """On a model whose rewrites all work, the dry run changes nothing."""
    b = Builder(13)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 3, 6, 3, prefix="c1"))
    y = b.relu(b.conv(y, 6, 5, 3, prefix="c2"))
    b.conv(
        b.node("Add", [b.conv(y, 5, 4, 1, prefix="c3"), b.conv(y, 5, 4, 1, prefix="c4")]),
        4,
        2,
        1,
        prefix="c5",
    )
    b.output("c5.out")
    path = b.save(tmp_path)
    plain = [(g.id, g.prunable) for g in analyze(path, check_rewrites=False).solution.groups]
    checked = [(g.id, g.prunable) for g in analyze(path).solution.groups]
    assert plain == checked
    assert sum(p for _, p in checked) == 3


# --- a real export: tf2onnx of keras Dense on feature maps, dynamic H and W ----------------------

KERAS_TENSORDOT = Path(__file__).resolve().parent / "data" / "keras_tensordot_dynamic_op13.onnx"
"""Made by ``tests/test_tf_exports.py``'s fixture code (``dense_on_maps``): conv 8 /2 same ->
conv 6 /2 same -> depthwise 3x3 /2 same -> Dense 12 (a Tensordot: Shape, Gather, ReduceProd,
Reshape, MatMul, Reshape to ``Concat(Shape[:3], [12])``) -> global pool -> Dense 4."""


@pytest.mark.parametrize(
    "hw,macs",
    [
        # by hand: conv1 H1*W1*8*27, conv2 H2*W2*6*72, depthwise H3*W3*6*9, Dense H3*W3*12*6, 4*12
        ((16, 12), 8 * 6 * 8 * 27 + 4 * 3 * 6 * 72 + 2 * 2 * 6 * 9 + 2 * 2 * 12 * 6 + 48),
        ((20, 20), 10 * 10 * 8 * 27 + 5 * 5 * 6 * 72 + 3 * 3 * 6 * 9 + 3 * 3 * 12 * 6 + 48),
    ],
)
def test_keras_tensordot_export_is_complete_and_prunes(
    hw: tuple[int, int], macs: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: ReduceProd stopped the shape arithmetic, the Dense MACs were silently missing and
    the hidden Dense width unprunable. Now: exact MACs, the width (12) prunes, the run-time
    Reshape target that holds it as a constant is corrected, verification passes."""
    shape = f"input=1,{hw[0]},{hw[1]},3"
    report = tmp_path / "report.json"
    argv = ["analyze", str(KERAS_TENSORDOT), "--input-shape", shape, "--json", str(report)]
    assert main(argv) == 0
    assert "shapes unknown" not in capsys.readouterr().err
    doc = json.loads(report.read_text())
    assert doc["totals"]["complete"] is True and doc["totals"]["macs"] == macs
    groups = sorted((g["channels"], g["prunable"]) for g in doc["groups"])
    assert groups == [(3, False), (4, False), (6, True), (8, True), (12, True)]
    every_other_mask(doc, tmp_path / "mask.json")
    out = tmp_path / "pruned.onnx"
    argv = ["prune", str(KERAS_TENSORDOT), "--input-shape", shape]
    assert main([*argv, "--mask", str(tmp_path / "mask.json"), "-o", str(out)]) == 0
    assert "verification passed" in capsys.readouterr().out


def test_self_check_on_a_file_listing_nodes_out_of_order(tmp_path: Path) -> None:
    """The dry run sorts the copy's nodes as the loader does: a file whose nodes are listed in
    reverse keeps exactly the prunable groups of the sorted one."""
    model = tf_same_conv_net(13, False, "float").model()
    sorted_path = tmp_path / "sorted.onnx"
    onnx.save(model, str(sorted_path))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    reversed_path = tmp_path / "reversed.onnx"
    onnx.save(model, str(reversed_path))
    want = sorted(g.channels for g in analyze(sorted_path).solution.groups if g.prunable)
    got = sorted(g.channels for g in analyze(reversed_path).solution.groups if g.prunable)
    assert got == want == [6, 8]
