"""Unit tests of the layer-by-layer verification: the zeroed reference, what is compared, and the
tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from morphonnx.analysis import Analysis, analyze
from morphonnx.prune import prune_model
from morphonnx.shapevalue import shape_derived
from morphonnx.verify import (
    RTOL,
    Verification,
    compare,
    random_feeds,
    run_all,
    verify,
    zeroed_original,
)

RNG = np.random.default_rng(0)


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _pos(*shape: int) -> np.ndarray:
    return RNG.uniform(0.5, 1.5, shape).astype(np.float32)


def _save(
    path: Path, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out: list[int]
) -> Path:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """conv1 (4) -> BN (scale in a Constant node) -> Relu -> conv2 (5) -> Mul per channel ->
    GlobalAveragePool -> Flatten -> Gemm (3, output)."""
    scale = numpy_helper.from_array(_pos(4), "bn_s_value")
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Constant", [], ["bn_s"], value=scale),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Mul", ["c2", "k"], ["m2"]),
        helper.make_node("GlobalAveragePool", ["m2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1),
    ]
    inits = {
        "w1": _f(4, 3, 3, 3),
        "b1": _f(4),
        "bn_b": _f(4),
        "bn_m": _f(4),
        "bn_v": _pos(4),
        "w2": _f(5, 4, 1, 1),
        "k": _pos(1, 5, 1, 1),
        "fc": _f(3, 5),
        "fc_b": _f(3),
    }
    return _save(tmp_path / "tiny.onnx", nodes, inits, [1, 3])


def _groups(a: Analysis) -> tuple[str, str]:
    by_producer = {
        m.tensor: g.id for g in a.solution.groups for m in g.members if m.role == "producer"
    }
    return by_producer["w1"], by_producer["w2"]


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def test_zeroed_original_zeroes_exactly_the_dead_slices(tiny: Path) -> None:
    a = analyze(tiny)
    g1, g2 = _groups(a)
    assert all(a.solution.group(g).prunable for g in (g1, g2))
    keep = {g1: [True, False, True, False], g2: [False, True, True, True, False]}
    before = _values(onnx.load(str(tiny)))

    zeroed = zeroed_original(a, keep)
    after = _values(zeroed)
    expected = {k: v.copy() for k, v in before.items()}
    for name in ("w1", "b1", "bn_s", "bn_b", "bn_m", "bn_v"):  # producer, bias, norm params
        expected[name][[1, 3]] = 0
    expected["w2"][:, [1, 3]] = 0  # consumer: inputs of conv2
    expected["w2"][[0, 4]] = 0  # producer of g2
    expected["k"][:, [0, 4]] = 0  # per-channel constant
    expected["fc"][:, [0, 4]] = 0  # Gemm rows after the Flatten
    assert set(after) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # the Constant node holding a member became an initializer
    assert "bn_s" in {t.name for t in zeroed.graph.initializer}
    assert "Constant" not in {n.op_type for n in zeroed.graph.node}
    # and the analysis' own model is untouched
    for name, value in _values(a.graph.model).items():
        np.testing.assert_array_equal(value, before[name])


def test_zeroed_original_with_all_kept_is_the_original(tiny: Path) -> None:
    a = analyze(tiny)
    g1, _ = _groups(a)
    before = _values(onnx.load(str(tiny)))
    for keep in ({}, {g1: [True] * 4}):
        after = _values(zeroed_original(a, keep))
        assert set(after) == set(before)
        for name, value in before.items():
            np.testing.assert_array_equal(after[name], value)


def test_verify_pruned_tiny_model(tiny: Path) -> None:
    a = analyze(tiny)
    g1, g2 = _groups(a)
    keep = {g1: [True, False, True, False], g2: [False, True, True, True, False]}
    pruned = prune_model(a, keep)
    for seed in (0, 1):
        v = verify(analyze(tiny), keep, pruned, seed=seed)
        assert v.ok, v.failures
        # every intermediate tensor and the output were compared
        assert v.tensors == len(onnx.load(str(tiny)).graph.node) - 1  # not the Constant
        assert v.max_rel < RTOL


def test_verify_names_the_first_wrong_tensor(tiny: Path) -> None:
    a = analyze(tiny)
    g1, _ = _groups(a)
    keep = {g1: [True, False, True, True]}
    pruned = prune_model(a, keep)
    bias = next(t for t in pruned.graph.initializer if t.name == "bn_b")
    value = numpy_helper.to_array(bias).copy()
    value[0] += 1.0  # a BN shift the zeroed original does not have
    bias.CopyFrom(numpy_helper.from_array(value, "bn_b"))
    v = verify(analyze(tiny), keep, pruned)
    named = [f.split("`")[1] for f in v.failures]
    assert named[:3] == ["n1", "r1", "c2"]
    assert "c1" not in named  # upstream of the wrong tensor all is well


def test_shape_derived_tensors_are_not_compared(tmp_path: Path) -> None:
    """conv1 -> Reshape to (N, C, H*W) with a target computed from Shape -> Reshape back with
    Shape of the conv output -> conv2: the shape tensors change when channels go, legitimately."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Shape", ["c1"], ["s"]),
        helper.make_node("Gather", ["s", "i01"], ["nc"], axis=0),
        helper.make_node("Concat", ["nc", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["c1", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["rf"]),
        helper.make_node("Reshape", ["rf", "s"], ["back"]),
        helper.make_node("Conv", ["back", "w2"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = {
        "w1": _f(6, 3, 1, 1),
        "i01": np.array([0, 1], dtype=np.int64),
        "minus1": np.array([-1], dtype=np.int64),
        "w2": _f(2, 6, 1, 1),
    }
    path = _save(tmp_path / "shapes.onnx", nodes, inits, [1, 2, 8, 8])
    a = analyze(path)
    (g,) = [g for g in a.solution.groups if g.prunable]
    assert g.channels == 6
    keep = {g.id: [True, False, True, False, False, True]}
    pruned = prune_model(a, keep)

    original = analyze(path)
    reference = zeroed_original(original, keep)
    assert {"s", "nc", "target"} <= shape_derived(reference.graph)
    assert not {"c1", "flat", "rf", "back"} & shape_derived(reference.graph)
    feeds = random_feeds(original)
    ref = run_all(reference, feeds, tmp_path, "ref")
    got = run_all(pruned, feeds, tmp_path, "got")
    assert not np.array_equal(ref["s"], got["s"])  # 6 channels vs 3: differs, and rightly so

    v = verify(original, keep, pruned)
    assert v.ok, v.failures
    assert v.tensors == 5  # c1, flat, rf, back, y; not s, nc, target
    unskipped = compare(original, keep, ref, got, set())
    assert {f.split("`")[1] for f in unskipped.failures} == {"s", "nc", "target"}


# --- compare: tolerance ---------------------------------------------------------------------


@pytest.fixture
def tiny_analysis(tiny: Path) -> Analysis:
    return analyze(tiny)


def _cmp(
    a: Analysis, ref: np.ndarray, got: np.ndarray, keep: dict[str, list[bool]] | None = None
) -> Verification:
    return compare(a, keep or {}, {"t": ref}, {"t": got}, set())


def test_tolerance_is_relative_to_the_largest_magnitude(tiny_analysis: Analysis) -> None:
    ref = np.array([1000.0, 1.0, -3.0], dtype=np.float32)
    # off by 0.05 on a tensor of magnitude 1000 passes (float reassociation at that scale)...
    ok = _cmp(tiny_analysis, ref, ref + np.array([0, 0.05, 0], dtype=np.float32))
    assert ok.ok and ok.tensors == 1
    assert ok.max_abs == pytest.approx(0.05, rel=1e-3)
    assert ok.max_rel == pytest.approx(0.05 / 1000, rel=1e-3) and ok.worst == "t"
    # ...twice the tolerance does not
    bad = _cmp(tiny_analysis, ref, ref + np.array([0, 0, 2 * RTOL * 1000], dtype=np.float32))
    assert not bad.ok and bad.failures[0].startswith("`t`: off by")


def test_a_zero_tensor_must_stay_zero(tiny_analysis: Analysis) -> None:
    zero = np.zeros(4, dtype=np.float32)
    assert _cmp(tiny_analysis, zero, zero + np.float32(1e-38)).ok  # denormals may be flushed
    assert not _cmp(tiny_analysis, zero, zero + np.float32(5e-8)).ok


def test_integer_tensors_must_be_equal(tiny_analysis: Analysis) -> None:
    ref = np.array([3, 4], dtype=np.int64)
    assert _cmp(tiny_analysis, ref, ref.copy()).ok
    bad = _cmp(tiny_analysis, ref, ref + 1)
    assert bad.failures == ["`t`: values differ"]


def test_non_finite_values_must_match(tiny_analysis: Analysis) -> None:
    ref = np.array([np.nan, 1.0, np.inf], dtype=np.float32)
    assert _cmp(tiny_analysis, ref, ref.copy()).ok
    # a NaN where the reference has a zero used to pass (both became 0)
    zero = np.zeros(3, dtype=np.float32)
    assert not _cmp(tiny_analysis, zero, np.array([np.nan, 0, 0], dtype=np.float32)).ok
    # an infinity in the reference does not make every other element pass
    wrong = np.array([np.nan, 2.0, np.inf], dtype=np.float32)
    assert not _cmp(tiny_analysis, ref, wrong).ok
    assert not _cmp(tiny_analysis, ref, np.array([np.nan, 1, -np.inf], dtype=np.float32)).ok


def test_shape_mismatch_is_a_failure(tiny_analysis: Analysis) -> None:
    bad = _cmp(tiny_analysis, np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32))
    assert bad.failures == ["`t`: shape (3, 2), expected (2, 3)"]
    assert bad.tensors == 0


def test_pruned_tensors_compare_on_kept_channels(tiny_analysis: Analysis) -> None:
    a = tiny_analysis
    g1, _ = _groups(a)
    keep = {g1: [True, False, True, False]}
    ref = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ok = compare(a, keep, {"r1": ref}, {"r1": ref[:, [0, 2]]}, set())
    assert ok.ok and ok.tensors == 1
    bad = compare(a, keep, {"r1": ref}, {"r1": ref[:, [0, 1]]}, set())
    assert not bad.ok and bad.failures[0].startswith("`r1`: off by")
    skipped = compare(a, keep, {"r1": ref}, {"r1": ref[:, [0, 1]]}, {"r1"})
    assert skipped.ok and skipped.tensors == 0


def test_run_all_exposes_every_used_tensor(tiny: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny))
    a = analyze(tiny)
    out = run_all(model, random_feeds(a), tmp_path, "all")
    assert set(out) == {"c1", "bn_s", "n1", "r1", "c2", "m2", "p", "f", "y"}
    assert len(model.graph.output) == 1  # the caller's model is not changed


def test_run_all_reads_external_data_from_base_dir(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(
        onnx.load(str(tiny)),
        str(path),
        save_as_external_data=True,
        location="w.data",
        size_threshold=0,
    )
    light = onnx.load(str(path), load_external_data=False)
    feeds = random_feeds(analyze(tiny))
    whole = run_all(onnx.load(str(tiny)), feeds, tmp_path, "whole")
    got = run_all(light, feeds, tmp_path, "light", base_dir=folder)
    np.testing.assert_array_equal(whole["y"], got["y"])
