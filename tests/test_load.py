"""Tests for morphonnx.load: untrusted files fail with one-line errors, valid ones load fully.

Every bad input must raise :class:`MorphonnxError` whose message is a single line naming the file
(the CLI prints it as is); nothing may escape as another exception type or load silently wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from light_models import light_model_paths  # noqa: E402
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import morphonnx.load.files
from morphonnx.costs import op_costs, totals
from morphonnx.errors import MorphonnxError
from morphonnx.graph import Graph
from morphonnx.load import load_graph

# --------------------------------------------------------------------------- helpers


def _error(path: Path | str, **kwargs) -> str:
    """Load ``path``, expect a MorphonnxError; check it is one line naming the file; return it."""
    with pytest.raises(MorphonnxError) as info:
        load_graph(path, **kwargs)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert len(msg.splitlines()) == 1, f"not one line: {msg!r}"
    assert "\n" not in msg and "\r" not in msg
    assert Path(path).name in msg, f"file name missing from {msg!r}"
    return msg


def _weights(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _conv_model(
    x_shape: Sequence[int | str | None] | None = (1, 3, 8, 8), *, opset: int = 17
) -> onnx.ModelProto:
    """x -> Conv(W 4x3x3x3, b, pad 1) -> Relu -> y, weights as initializers."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    inits = [
        numpy_helper.from_array(_weights([4, 3, 3, 3]), "W"),
        numpy_helper.from_array(_weights([4], 1), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def _externalize(model: onnx.ModelProto, location: str, **entries: int) -> bytes:
    """Mark initializer ``W`` as stored externally at ``location``; return its raw bytes."""
    t = next(t for t in model.graph.initializer if t.name == "W")
    raw = t.raw_data
    external_data_helper.set_external_data(
        t,
        location=location,
        offset=entries.get("offset", 0),
        length=entries.get("length", len(raw)),
    )
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    return raw


# --------------------------------------------------------------------------- not ONNX at all


def test_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a valid ONNX model" in _error(p)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("this is not a model\nsecond line\n")
    assert "not a valid ONNX model" in _error(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    _error(p)


def test_other_protobuf_message(tmp_path: Path) -> None:
    # a TensorProto parses as a (graph-less) ModelProto: still refused
    p = tmp_path / "tensor.onnx"
    p.write_bytes(numpy_helper.from_array(_weights([8, 8]), "t").SerializeToString())
    _error(p)


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.onnx")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "model_dir.onnx"
    d.mkdir()
    assert "not a file" in _error(d)


# --------------------------------------------------------------------------- truncation


def _assert_loads_whole(graph: Graph, reference: Graph) -> None:
    """A truncated file that loads must be the complete graph (protobuf field boundary)."""
    assert [n.name for n in graph.nodes] == [n.name for n in reference.nodes]
    assert graph.outputs == reference.outputs
    for out in graph.outputs:
        assert graph.shape(out) == reference.shape(out)
    assert totals(graph, op_costs(graph)).macs == totals(reference, op_costs(reference)).macs


def _check_truncations(src: bytes, cuts: Sequence[int], path: Path, reference: Graph) -> list[int]:
    """Load each prefix ``src[:cut]``: one-line error or the whole graph. Returns cuts that load."""
    loaded = []
    for cut in cuts:
        path.write_bytes(src[:cut])
        try:
            graph = load_graph(path)
        except MorphonnxError as err:
            msg = str(err)
            assert len(msg.splitlines()) == 1 and path.name in msg, (cut, msg)
            continue
        _assert_loads_whole(graph, reference)
        loaded.append(cut)
    return loaded


def test_truncated_small_model_every_byte(tmp_path: Path) -> None:
    model = _conv_model()
    model.producer_name = "test"
    core = len(model.SerializeToString())
    model.metadata_props.add(key="k", value="v")  # written after opset_import
    src = model.SerializeToString()
    reference = load_graph(_save(model, tmp_path / "full.onnx"))
    loaded = _check_truncations(src, range(len(src)), tmp_path / "cut.onnx", reference)
    # only a cut that keeps graph and opset_import whole (inside the metadata) may load
    assert loaded == [core]


def test_truncated_model_without_opset_import(tmp_path: Path) -> None:
    # graph (field 7) is written before opset_import (field 8): a cut between them parses
    model = _conv_model()
    whole = model.SerializeToString()
    model.ClearField("opset_import")
    cut = model.SerializeToString()
    assert whole.startswith(cut)
    assert "opset" in _error(_save(model, tmp_path / "cut.onnx"))


@pytest.mark.parametrize("name", ["squeezenet", "resnet50"])
def test_truncated_zoo_model(tmp_path: Path, name: str) -> None:
    src_path = light_model_paths()[name]
    src = src_path.read_bytes()
    reference = load_graph(src_path)
    n = len(src)
    cuts = sorted({n // 2, 1, 16, n // 3, 2 * n // 3, n - 1, n - 16} | set(range(0, n, n // 97)))
    path = tmp_path / f"{name}_cut.onnx"
    _check_truncations(src, cuts, path, reference)
    path.write_bytes(src[: n // 2])
    assert "not a valid ONNX model" in _error(path)


# --------------------------------------------------------------------------- external data


def test_external_data_inside_folder(tmp_path: Path) -> None:
    model = _conv_model()
    want = numpy_helper.to_array(model.graph.initializer[0])
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(
        model,
        str(d / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    stored = onnx.load(str(d / "m.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    graph = load_graph(d / "m.onnx")
    assert graph.shape("W") == (4, 3, 3, 3)
    assert graph.shape("b") == (4,)
    assert graph.shape("y") == (1, 4, 8, 8)
    np.testing.assert_array_equal(graph.value("W"), want)
    assert totals(graph, op_costs(graph)).params == 108 + 4


def test_external_data_in_subfolder_and_dot_path(tmp_path: Path) -> None:
    for loc in ("data/w.bin", "./w.bin"):
        model = _conv_model()
        raw = _externalize(model, loc)
        (tmp_path / loc).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / loc).write_bytes(raw)
        graph = load_graph(_save(model, tmp_path / "m.onnx"))
        assert graph.shape("W") == (4, 3, 3, 3)
        np.testing.assert_array_equal(
            graph.value("W"), np.frombuffer(raw, np.float32).reshape(4, 3, 3, 3)
        )


def test_external_data_with_offset(tmp_path: Path) -> None:
    model = _conv_model()
    raw = _externalize(model, "w.bin", offset=64)
    (tmp_path / "w.bin").write_bytes(b"\0" * 64 + raw)
    graph = load_graph(_save(model, tmp_path / "m.onnx"))
    assert graph.value("W").shape == (4, 3, 3, 3)


@pytest.mark.parametrize("location", ["ABS", "../outside.bin", "sub/../../outside.bin", ".."])
def test_external_data_escaping_folder(tmp_path: Path, location: str) -> None:
    outside = tmp_path / "outside.bin"
    model = _conv_model()
    if location == "ABS":
        location = str(outside)
    raw = _externalize(model, location)
    outside.write_bytes(raw)  # the file exists: the location alone is refused
    (tmp_path / "model" / "sub").mkdir(parents=True)
    msg = _error(_save(model, tmp_path / "model" / "m.onnx"))
    assert "outside the model's folder" in msg and "'W'" in msg


def test_external_data_symlink_escaping(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    model = _conv_model()
    raw = _externalize(model, "link.bin")
    (outside / "w.bin").write_bytes(raw)
    d = tmp_path / "model"
    d.mkdir()
    os.symlink(outside / "w.bin", d / "link.bin")
    assert "outside the model's folder" in _error(_save(model, d / "m.onnx"))

    # a symlinked directory inside the folder that leads out
    model = _conv_model()
    _externalize(model, "sub/w.bin")
    os.symlink(outside, d / "sub")
    assert "outside the model's folder" in _error(_save(model, d / "m2.onnx"))


def test_external_data_symlink_inside_folder_is_fine(tmp_path: Path) -> None:
    model = _conv_model()
    raw = _externalize(model, "link.bin")
    (tmp_path / "real.bin").write_bytes(raw)
    os.symlink(tmp_path / "real.bin", tmp_path / "link.bin")
    assert load_graph(_save(model, tmp_path / "m.onnx")).shape("W") == (4, 3, 3, 3)


def test_symlinked_model_reads_data_next_to_the_link(tmp_path: Path) -> None:
    # the model's folder is where the given path is; data next to the link target only is missing
    model = _conv_model()
    raw = _externalize(model, "w.bin")
    real = _save(model, tmp_path / "real" / "m.onnx")
    (tmp_path / "real" / "w.bin").write_bytes(raw)
    (tmp_path / "view").mkdir()
    link = tmp_path / "view" / "link.onnx"
    os.symlink(real, link)
    assert "missing" in _error(link)
    (tmp_path / "view" / "w.bin").write_bytes(raw)
    assert load_graph(link).value("W").shape == (4, 3, 3, 3)


def test_external_data_in_constant_node_escaping(tmp_path: Path) -> None:
    t = numpy_helper.from_array(_weights([4, 3, 3, 3]), "Wc")
    (tmp_path / "outside.bin").write_bytes(t.raw_data)
    external_data_helper.set_external_data(t, location="../outside.bin", length=len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    nodes = [
        helper.make_node("Constant", [], ["W"], value=t),
        helper.make_node("Conv", ["x", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert "outside the model's folder" in _error(_save(model, tmp_path / "m" / "m.onnx"))


def test_external_data_missing_file(tmp_path: Path) -> None:
    model = _conv_model()
    _externalize(model, "weights.bin")
    msg = _error(_save(model, tmp_path / "m.onnx"))
    assert "missing" in msg and "weights.bin" in msg


def test_external_data_file_too_short(tmp_path: Path) -> None:
    for entries in ({}, {"length": 0}):
        model = _conv_model()
        raw = _externalize(model, "w.bin", **entries)
        if entries:  # no length recorded: the tensor's own size is what must be there
            t = model.graph.initializer[0]
            keep = [e for e in t.external_data if e.key != "length"]
            del t.external_data[:]
            t.external_data.extend(keep)
        (tmp_path / "w.bin").write_bytes(raw[: len(raw) // 2])
        assert "shorter" in _error(_save(model, tmp_path / "m.onnx"))


@pytest.mark.parametrize("offset", ["abc", "-4"])
def test_external_data_bad_offset(tmp_path: Path, offset: str) -> None:
    model = _conv_model()
    raw = _externalize(model, "w.bin")
    t = model.graph.initializer[0]
    next(e for e in t.external_data if e.key == "offset").value = offset
    (tmp_path / "w.bin").write_bytes(raw)
    assert "offset" in _error(_save(model, tmp_path / "m.onnx"))


def test_line_breaks_in_names_stay_on_one_line(tmp_path: Path) -> None:
    model = _conv_model()
    _externalize(model, "we\nights\r.bin")
    msg = _error(_save(model, tmp_path / "m.onnx"))
    assert "we\\nights\\r.bin" in msg


# --------------------------------------------------------------------------- input shapes


def test_symbolic_batch_filled_by_batch(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, 8, 8]), tmp_path / "m.onnx")
    assert load_graph(p).shape("x") == (1, 3, 8, 8)
    graph = load_graph(p, batch=5)
    assert graph.shape("x") == (5, 3, 8, 8)
    assert graph.shape("y") == (5, 4, 8, 8)
    # an unnamed unknown batch dim too
    p2 = _save(_conv_model([None, 3, 8, 8]), tmp_path / "m2.onnx")
    assert load_graph(p2, batch=3).shape("y") == (3, 4, 8, 8)


def test_batch_does_not_override_fixed_batch(tmp_path: Path) -> None:
    p = _save(_conv_model([2, 3, 8, 8]), tmp_path / "m.onnx")
    assert load_graph(p, batch=4).shape("x") == (2, 3, 8, 8)


def test_symbolic_spatial_dim_needs_input_shape(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, "height", "width"]), tmp_path / "m.onnx")
    msg = _error(p)
    assert "'height'" in msg and "'x'" in msg and "--input-shape x=" in msg
    msg = _error(p, batch=4)
    assert "--input-shape x=4,3," in msg
    graph = load_graph(p, input_shapes={"x": [2, 3, 16, 12]})
    assert graph.shape("y") == (2, 4, 16, 12)


def test_input_without_declared_shape(tmp_path: Path) -> None:
    p = _save(_conv_model(None), tmp_path / "m.onnx")
    assert "--input-shape x=" in _error(p)
    assert load_graph(p, input_shapes={"x": [1, 3, 4, 4]}).shape("y") == (1, 4, 4, 4)


def test_input_shape_for_unknown_name(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    msg = _error(p, input_shapes={"image": [1, 3, 8, 8]})
    assert "'image'" in msg and "not an input" in msg
    # an initializer is not an input either
    assert "not an input" in _error(p, input_shapes={"W": [4, 3, 3, 3]})


def test_input_shape_wrong_rank(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    msg = _error(p, input_shapes={"x": [3, 8, 8]})
    assert "rank 4" in msg and "3" in msg


@pytest.mark.parametrize("shape", [[1, 3, 0, 8], [1, 3, -1, 8]])
def test_input_shape_non_positive(tmp_path: Path, shape: list[int]) -> None:
    p = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    _error(p, input_shapes={"x": shape})


def test_bad_batch(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, 8, 8]), tmp_path / "m.onnx")
    assert "--batch" in _error(p, batch=0)


# --------------------------------------------------------------------------- broken graphs


def _plain_model(nodes: list[onnx.NodeProto], out: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_node_reads_undefined_tensor(tmp_path: Path) -> None:
    model = _plain_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])
    msg = _error(_save(model, tmp_path / "m.onnx"))
    assert "'ghost'" in msg and "'add'" in msg


def test_output_not_produced(tmp_path: Path) -> None:
    model = _plain_model([helper.make_node("Relu", ["x"], ["r"])], out="y")
    assert "'y'" in _error(_save(model, tmp_path / "m.onnx"))


def test_cycle(tmp_path: Path) -> None:
    model = _plain_model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["b"], name="relu"),
            helper.make_node("Relu", ["a"], ["y"], name="out"),
        ]
    )
    assert "cycle" in _error(_save(model, tmp_path / "m.onnx"))


def test_constant_node_without_value(tmp_path: Path) -> None:
    model = _plain_model(
        [helper.make_node("Constant", [], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])]
    )
    assert "Constant" in _error(_save(model, tmp_path / "m.onnx"))


# --------------------------------------------------------------------------- valid models


def _opset_model(opset: int) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Pad -> MaxPool -> ReduceMean -> Flatten -> Gemm -> Unsqueeze,
    written with the inputs/attributes each opset expects (Pad, ReduceMean, Unsqueeze moved
    attributes to inputs in 11, 18 and 13)."""
    c = 4
    inits = [
        numpy_helper.from_array(_weights([c, 3, 3, 3]), "W"),
        numpy_helper.from_array(_weights([c], 1) + 2, "gamma"),
        numpy_helper.from_array(_weights([c], 2), "beta"),
        numpy_helper.from_array(_weights([c], 3), "mean"),
        numpy_helper.from_array(np.abs(_weights([c], 4)) + 1, "var"),
        numpy_helper.from_array(_weights([5, c], 5), "Wfc"),
        numpy_helper.from_array(_weights([5], 6), "bfc"),
    ]
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
    ]
    if opset < 11:
        nodes.append(helper.make_node("Pad", ["r"], ["p"], pads=pads))
    else:
        inits.append(numpy_helper.from_array(np.array(pads, np.int64), "pads"))
        nodes.append(helper.make_node("Pad", ["r", "pads"], ["p"]))
    nodes.append(helper.make_node("MaxPool", ["p"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]))
    if opset < 18:
        nodes.append(helper.make_node("ReduceMean", ["mp"], ["rm"], axes=[2, 3], keepdims=1))
    else:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes23"))
        nodes.append(helper.make_node("ReduceMean", ["mp", "axes23"], ["rm"], keepdims=1))
    nodes.append(helper.make_node("Flatten", ["rm"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["g"], transB=1))
    if opset < 13:
        nodes.append(helper.make_node("Unsqueeze", ["g"], ["y"], axes=[1]))
    else:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
        nodes.append(helper.make_node("Unsqueeze", ["g", "axis1"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 5])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("opset", sorted({9, 11, 13, 17, onnx.defs.onnx_opset_version()}))
def test_opsets(tmp_path: Path, opset: int) -> None:
    p = _save(_opset_model(opset), tmp_path / f"opset{opset}.onnx")
    graph = load_graph(p, batch=2)
    assert graph.opset == opset
    expected = {
        "c": (2, 4, 8, 8),
        "bn": (2, 4, 8, 8),
        "p": (2, 4, 10, 10),
        "mp": (2, 4, 5, 5),
        "rm": (2, 4, 1, 1),
        "f": (2, 4),
        "g": (2, 5),
        "y": (2, 1, 5),
    }
    assert {k: graph.shape(k) for k in expected} == expected
    t = totals(graph, op_costs(graph))
    assert t.macs == 2 * (256 * 27 + 5 * 4)
    # weights and BN parameters; int64 pads/axes are not parameters
    assert t.params == 108 + 4 * 4 + 20 + 5


def test_ir3_initializers_listed_as_inputs(tmp_path: Path) -> None:
    model = _opset_model(9)
    model.ir_version = 3
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    graph = load_graph(_save(model, tmp_path / "ir3.onnx"))
    assert graph.inputs == ["x"]
    assert graph.shape("y") == (1, 1, 5)
    assert graph.is_const("W")


def test_all_zoo_models_load() -> None:
    for name, path in light_model_paths().items():
        graph = load_graph(path)
        assert graph.opset == 9, name
        for out in graph.outputs:
            shape = graph.shape(out)
            assert shape is not None and all(d > 0 for d in shape), (name, out)


def test_unnamed_nodes_get_unique_stable_names(tmp_path: Path) -> None:
    chain = ["x", "a", "b", "c", "d", "e", "y"]
    names = ["", "Relu_0", "", "dup", "dup", ""]
    # listed out of order on purpose: names follow the file, not the sorted order
    nodes = [helper.make_node("Relu", [chain[i]], [chain[i + 1]], name=names[i]) for i in range(6)]
    order = [0, 1, 2, 3, 5, 4]
    model = _plain_model([nodes[i] for i in order])
    p = _save(model, tmp_path / "m.onnx")
    first = [n.name for n in load_graph(p).nodes]
    assert first == [n.name for n in load_graph(p).nodes]  # stable across loads
    assert len(set(first)) == len(first)
    assert all(first)
    assert first[1] == "Relu_0"  # an explicit name is kept ...
    assert first[0] != "Relu_0"  # ... and a generated one never takes it
    assert first[3] == "dup"  # the first of two equal names keeps it
    assert [n.op_type for n in load_graph(p).nodes] == ["Relu"] * 6
    # topological order: node k reads chain[k]
    assert [n.inputs[0] for n in load_graph(p).nodes] == chain[:6]
    costs = op_costs(load_graph(p))
    assert [c.name for c in costs] == first


def test_zoo_node_names_unique_and_stable() -> None:
    path = light_model_paths()["squeezenet"]  # its 39 ConstantOfShape nodes have no name
    proto = onnx.load(str(path))
    assert sum(1 for n in proto.graph.node if not n.name) == 39
    a, b = load_graph(path), load_graph(path)
    names = [n.name for n in a.nodes]
    assert len(set(names)) == len(names) == len(proto.graph.node)
    assert {n.name for n in proto.graph.node if n.name} <= set(names)
    assert names == [n.name for n in b.nodes]
    assert [c.name for c in op_costs(a)] == names


def test_constant_node_weights(tmp_path: Path) -> None:
    w = _weights([16, 3, 3, 3])  # 432 elements: stays in the shape-inference copy
    w2 = _weights([32, 16, 3, 3], 1)  # 4608 elements: replaced by a typed input there
    nodes = [
        helper.make_node("Constant", [], ["W"], name="", value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["b"], value_floats=[0.1] * 16),
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["W2"], name="k", value=numpy_helper.from_array(w2)),
        helper.make_node("Conv", ["c", "W2"], ["y"], name="conv2"),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)])
    graph = load_graph(_save(model, tmp_path / "m.onnx"))
    for name, shape in (("W", (16, 3, 3, 3)), ("b", (16,)), ("W2", (32, 16, 3, 3))):
        assert graph.is_const(name)
        assert graph.constants[name].kind == "constant_node"
        assert graph.shape(name) == shape
    np.testing.assert_array_equal(graph.value("W"), w)
    np.testing.assert_array_equal(graph.value("W2"), w2)
    assert graph.shape("c") == (1, 16, 8, 8)
    assert graph.shape("y") == (1, 32, 6, 6)
    costs = {c.name: c for c in op_costs(graph)}
    assert costs["conv1"].params == 432 + 16
    assert costs["conv2"].params == 4608
    assert costs["k"].macs == costs["k"].params == costs["k"].bytes == 0
    assert totals(graph, list(costs.values())).params == 432 + 16 + 4608


# --------------------------------------------------------------------------- corrupt tensors


@pytest.mark.parametrize(
    ("corruption", "words"),
    [
        ("negative_dim", "negative dims"),
        ("short_raw_data", "bytes"),
        ("huge_dims", "bytes"),
        ("undefined_type", "data type"),
        ("unknown_type", "data type"),
    ],
)
def test_corrupt_initializer(tmp_path: Path, corruption: str, words: str) -> None:
    model = _conv_model()
    t = model.graph.initializer[0]
    if corruption == "negative_dim":
        t.dims[0] = -4
    elif corruption == "short_raw_data":
        t.raw_data = t.raw_data[:50]
    elif corruption == "huge_dims":
        t.dims[0] = 10**12
    elif corruption == "undefined_type":
        t.data_type = TensorProto.UNDEFINED
    else:
        t.data_type = 999
    msg = _error(_save(model, tmp_path / "m.onnx"))
    assert words in msg and "'W'" in msg


def test_input_shape_not_integers(tmp_path: Path) -> None:
    p = _save(_conv_model(["N", 3, "H", "W"]), tmp_path / "m.onnx")
    assert "integers" in _error(p, input_shapes={"x": [1, 3, 8.5, 8]})
    assert "integers" in _error(p, input_shapes={"x": ["1", "3", "8", "8"]})
    graph = load_graph(p, input_shapes={"x": np.array([1, 3, 6, 6], dtype=np.int64).tolist()})
    assert graph.shape("y") == (1, 4, 6, 6)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _save(_conv_model(), tmp_path / "locked.onnx")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(morphonnx.load.files, "read_stripped", denied)  # root ignores chmod 000
    msg = _error(p)
    assert "cannot read" in msg and "Permission denied" in msg


def test_nodes_out_of_order_are_sorted(tmp_path: Path) -> None:
    """A file whose nodes are not in topological order loads sorted, groups and costs intact."""
    model = _conv_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # Relu before the Conv that feeds it
    g = load_graph(_save(model, tmp_path / "m.onnx"))
    assert [n.op_type for n in g.nodes] == ["Conv", "Relu"]
    assert g.shape("y") == (1, 4, 8, 8)
    assert totals(g, op_costs(g)).macs == 4 * 8 * 8 * 3 * 3 * 3
