"""morphonnx.formats: the structural fingerprint, atomic writes, reading specs and masks.

The fingerprint must see structure (op types, attributes, tensor names, shapes, dtypes) and never
weight values; a write that fails must leave neither a half-written file nor a clobbered old one.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from morphonnx.errors import MorphonnxError
from morphonnx.formats import (
    MASK_FORMAT,
    SPEC_FORMAT,
    VERSION,
    atomic_write,
    fingerprint,
    mask_document,
    read_json,
    read_mask,
    write_json,
)


def conv_model(
    *,
    seed: int = 0,
    cout: int = 4,
    pads: int = 1,
    weight_name: str = "w",
    const_value: float = 0.5,
    batch: int | str = 1,
) -> onnx.ModelProto:
    """x -> Conv(w, b) -> Mul(Constant) -> y; every knob changes one thing about the model."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(
        rng.standard_normal((cout, 3, 3, 3)).astype(np.float32), weight_name
    )
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    scale = helper.make_node(
        "Constant",
        [],
        ["s"],
        value=numpy_helper.from_array(np.full((1, cout, 1, 1), const_value, np.float32)),
    )
    conv = helper.make_node("Conv", ["x", weight_name, "b"], ["c"], pads=[pads] * 4)
    mul = helper.make_node("Mul", ["c", "s"], ["y"])
    graph = helper.make_graph(
        [scale, conv, mul],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_a_stable_short_hex_string() -> None:
    fp = fingerprint(conv_model())
    assert fp == fingerprint(conv_model())
    assert len(fp) == 32
    int(fp, 16)


def test_fingerprint_ignores_weight_values() -> None:
    base = fingerprint(conv_model(seed=0))
    assert fingerprint(conv_model(seed=1)) == base  # initializer values
    assert fingerprint(conv_model(const_value=2.0)) == base  # Constant-node tensor values


def test_fingerprint_ignores_raw_vs_typed_storage() -> None:
    m = conv_model()
    typed = onnx.ModelProto()
    typed.CopyFrom(m)
    w = typed.graph.initializer[0]
    values = numpy_helper.to_array(w)
    w.ClearField("raw_data")
    w.float_data.extend(values.reshape(-1).tolist())
    assert fingerprint(typed) == fingerprint(m)


@pytest.mark.parametrize(
    "change",
    [
        {"cout": 5},  # initializer shape
        {"pads": 0},  # attribute
        {"weight_name": "conv.weight"},  # tensor name
        {"batch": "N"},  # declared input shape
    ],
    ids=lambda c: next(iter(c)),
)
def test_fingerprint_sees_structure(change: dict[str, object]) -> None:
    assert fingerprint(conv_model(**change)) != fingerprint(conv_model())  # type: ignore[arg-type]


def test_fingerprint_sees_op_types_dtypes_and_opset() -> None:
    base = fingerprint(conv_model())
    relu = conv_model()
    relu.graph.node[2].op_type = "Add"
    assert fingerprint(relu) != base
    double = conv_model()
    double.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(4, np.float64), "b"))
    assert fingerprint(double) != base
    opset = conv_model()
    opset.opset_import[0].version = 18
    assert fingerprint(opset) != base


def test_fingerprint_ignores_node_names_and_doc_strings() -> None:
    m = conv_model()
    m.graph.node[1].name = "renamed"
    m.graph.node[1].doc_string = "notes"
    m.producer_name = "someone else"
    assert fingerprint(m) == fingerprint(conv_model())


# --------------------------------------------------------------------------- atomic writes


def test_write_json_round_trip_and_mode(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    write_json(out, {"k": [1, 2]})
    assert json.loads(out.read_text()) == {"k": [1, 2]}
    assert out.read_text().endswith("\n")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind


def test_failed_write_leaves_old_file_untouched(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    out.write_text("old")

    def broken(p: Path) -> None:
        p.write_text("half")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        atomic_write(out, broken)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_leaves_no_new_file(tmp_path: Path) -> None:
    def broken(p: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.json", broken)
    assert list(tmp_path.iterdir()) == []


def test_write_into_missing_folder_or_onto_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MorphonnxError, match="does not exist"):
        write_json(tmp_path / "nope" / "a.json", {})
    (tmp_path / "d").mkdir()
    with pytest.raises(MorphonnxError, match="folder"):
        write_json(tmp_path / "d", {})
    assert list((tmp_path / "d").iterdir()) == []


# --------------------------------------------------------------------------- reading


def test_read_json_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(MorphonnxError, match="missing.json: file not found"):
        read_json(missing, SPEC_FORMAT)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(MorphonnxError, match="bad.json: not valid JSON"):
        read_json(bad, SPEC_FORMAT)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MorphonnxError, match="binary.json"):
        read_json(binary, SPEC_FORMAT)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": MASK_FORMAT, "version": VERSION}))
    with pytest.raises(MorphonnxError, match="wrong.json: not a morphonnx.spec file"):
        read_json(wrong, SPEC_FORMAT)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(MorphonnxError, match="list.json: not a morphonnx.spec file"):
        read_json(listing, SPEC_FORMAT)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": SPEC_FORMAT, "version": VERSION + 1}))
    with pytest.raises(MorphonnxError, match="future.json: unsupported morphonnx.spec version"):
        read_json(future, SPEC_FORMAT)


def test_read_mask_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json(path, mask_document("abc", {"g0": [True, False]}, threshold=0.1))
    data = json.loads(path.read_text())
    assert data["format"] == MASK_FORMAT and data["version"] == VERSION
    assert data["threshold"] == 0.1
    assert read_mask(path) == ("abc", {"g0": [True, False]})


@pytest.mark.parametrize(
    "doc",
    [
        {"groups": {"g0": [True]}},  # no fingerprint
        {"model_fingerprint": "abc", "groups": [[True]]},  # groups not an object
        {"model_fingerprint": "abc", "groups": {"g0": [1, 0]}},  # ints, not booleans
        {"model_fingerprint": "abc", "groups": {"g0": "true"}},
    ],
)
def test_read_mask_refuses_malformed_entries(tmp_path: Path, doc: dict[str, object]) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": MASK_FORMAT, "version": VERSION, **doc}))
    with pytest.raises(MorphonnxError, match="m.json"):
        read_mask(path)


def test_fingerprint_sees_small_integer_constants() -> None:
    """A Reshape target is structure: a model reshaping to another shape is another model."""

    def reshape_model(target: list[int]) -> onnx.ModelProto:
        shape = numpy_helper.from_array(np.array(target, dtype=np.int64), "shape")
        node = helper.make_node("Reshape", ["x", "shape"], ["y"])
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [shape],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert fingerprint(reshape_model([1, 16])) != fingerprint(reshape_model([1, 4, 4]))
    assert fingerprint(reshape_model([1, 16])) != fingerprint(reshape_model([16, 1]))
    assert fingerprint(reshape_model([1, 16])) == fingerprint(reshape_model([1, 16]))
