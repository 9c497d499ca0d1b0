"""One evaluator of shape computations, and every module that needs one agrees with it.

The same shape computations (torch's ``Shape -> Gather -> Div -> Mul``, ``Size``, pad vectors from
``ConstantOfShape``, ``Concat`` of ``Unsqueeze``, ``Cast``, ``Slice`` of a shape) are fed to the
evaluator itself, to shape-inference pinning, to the channel rules' ``shape_value``, to constant
discovery and to verification's list of shape-derived tensors, and checked against values computed
by hand from the model's shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from morphonnx.groups import solve
from morphonnx.ir import Node
from morphonnx.load import load_graph
from morphonnx.load.shapes import _infer, _pin_shape_values
from morphonnx.shapevalue import SHAPE_VALUE_LIMIT, graph_values, shape_derived, small_initializers

# x [1, 3, 4, 5] -> Conv (6 filters) -> y [1, 6, 4, 5]; shape computations on y:
EXPECTED = {
    "s": np.array([1, 6, 4, 5]),  # Shape(y)
    "c": np.array(6),  # Gather(s, 1): the channel count
    "h": np.array(3),  # Div(c, 2)
    "m": np.array(6),  # Mul(h, 2)
    "sz": np.array(120),  # Size(y) = 1 * 6 * 4 * 5
    "hw": np.array([4, 5]),  # Slice(s, 2, 4)
    "u1": np.array([6]),  # Unsqueeze(m, 0)
    "u2": np.array([3]),  # Unsqueeze(h, 0)
    "cat": np.array([6, 3]),  # Concat(u1, u2)
    "catf": np.array([6.0, 3.0]),  # Cast(cat, FLOAT)
    "r8": np.array([8]),  # Mul([4], 2): from constants only
    "pads": np.zeros(8, np.int64),  # ConstantOfShape(r8) of int64 0: torch's pad vector
    "flat": np.array([1, 120]),  # Concat([1], Unsqueeze(sz)): a Flatten target
}
CHANNELS_ONLY = {"c", "h", "m", "u1", "u2", "cat", "r8", "pads"}
"""Integer values that depend on channel counts only: the channel rules may use these."""


def _model() -> onnx.ModelProto:
    i64 = TensorProto.INT64

    def const(name: str, value: list[int] | int) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.int64))
        )

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"]),
        helper.make_node("Shape", ["y"], ["s"]),
        const("one", 1),
        helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Div", ["c", "two"], ["h"]),
        helper.make_node("Mul", ["h", "two"], ["m"]),
        helper.make_node("Size", ["y"], ["sz"]),
        helper.make_node("Slice", ["s", "start", "end"], ["hw"]),
        helper.make_node("Unsqueeze", ["m", "zero"], ["u1"]),
        helper.make_node("Unsqueeze", ["h", "zero"], ["u2"]),
        helper.make_node("Concat", ["u1", "u2"], ["cat"], axis=0),
        helper.make_node("Cast", ["cat"], ["catf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["four", "two"], ["r8"]),
        helper.make_node(
            "ConstantOfShape", ["r8"], ["pads"], value=helper.make_tensor("", i64, [1], [0])
        ),
        helper.make_node("Unsqueeze", ["sz", "zero"], ["usz"]),
        helper.make_node("Concat", ["one1", "usz"], ["flat"], axis=0),
        helper.make_node("Reshape", ["y", "flat"], ["yf"]),
        helper.make_node("Pad", ["y", "pads"], ["yp"]),
    ]
    w = np.random.default_rng(0).standard_normal((6, 3, 1, 1)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([4], np.int64), "four"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array([2], np.int64), "start"),
        numpy_helper.from_array(np.array([4], np.int64), "end"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one1"),
    ]
    outputs = ["yf", "yp", "hw", "catf"]
    graph = helper.make_graph(
        nodes,
        "shape_values",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("shapevalue") / "m.onnx"
    onnx.save(_model(), p)
    return p


def _assert_values(got: dict[str, np.ndarray | None], names: set[str]) -> None:
    for name in names:
        value = got[name]
        assert value is not None, name
        np.testing.assert_array_equal(value, EXPECTED[name], err_msg=name)


def test_evaluator(path: Path) -> None:
    model = onnx.load(path)
    nodes = [Node.from_proto(n) for n in model.graph.node]
    shapes = {"x": (1, 3, 4, 5), "y": (1, 6, 4, 5)}
    values = graph_values(nodes, small_initializers(model.graph.initializer), shapes.get)
    _assert_values({t: values.value(t) for t in EXPECTED}, set(EXPECTED))
    assert values.value("y") is None  # not a shape computation: a Conv's output
    assert values.value("catf").dtype == np.float32


def test_pinning(path: Path) -> None:
    """Shape inference is given every value it could use, computed by the evaluator."""
    light = onnx.load(path)
    assert _pin_shape_values(light, _infer(path, light))
    pinned = {
        t.name.removesuffix("__morphonnx_value"): numpy_helper.to_array(t)
        for t in light.graph.initializer
        if t.name.endswith("__morphonnx_value")
    }
    consumed = {t for n in _model().graph.node for t in n.input}
    _assert_values(dict.fromkeys(EXPECTED) | pinned, set(EXPECTED) & consumed)


def test_loaded_shapes(path: Path) -> None:
    g = load_graph(path)
    assert g.shape("yf") == (1, 120)
    assert g.shape("yp") == (1, 6, 4, 5)  # zero pads
    assert g.shape("catf") == (2,)


def test_channel_rules(path: Path) -> None:
    """The channel rules see the values that depend on channel counts only, and no others."""
    channels = solve(load_graph(path)).channels
    got = {t: channels.shape_value(t) for t in EXPECTED}
    _assert_values(got, CHANNELS_ONLY)
    assert all(got[t] is None for t in set(EXPECTED) - CHANNELS_ONLY)


def test_constant_discovery(tmp_path: Path) -> None:
    """A ConstantOfShape whose shape is computed from constants only is a constant (a weight)."""
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("", i64, [], [4])),
        helper.make_node("Unsqueeze", ["k", "zero"], ["uk"]),
        helper.make_node("Concat", ["one1", "uk"], ["shape"], axis=0),
        helper.make_node("Cast", ["shape"], ["shape64"], to=i64),
        helper.make_node(
            "ConstantOfShape", ["shape64"], ["bias"], value=helper.make_tensor("", 1, [1], [0.5])
        ),
        helper.make_node("Add", ["x", "bias"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one1"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    p = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), p)
    g = load_graph(p)
    assert g.constants["bias"].kind == "constant_of_shape"
    np.testing.assert_array_equal(g.value("bias"), np.full((1, 4), 0.5, np.float32))


def test_verification_skips_exactly_the_shape_derived(path: Path) -> None:
    derived = shape_derived(onnx.load(path).graph)
    assert derived == set(EXPECTED) - {"r8", "pads"} | {"usz"}


def test_one_limit(tmp_path: Path) -> None:
    """A value over the limit is nobody's shape value (a ConstantOfShape of that many zeros)."""
    n = SHAPE_VALUE_LIMIT + 1
    nodes = [
        Node(0, "a", "ConstantOfShape", "", ["big"], ["zeros"], {}),
        Node(1, "b", "ConstantOfShape", "", ["ok"], ["fits"], {}),
    ]
    constants = {"big": np.array([n]), "ok": np.array([n - 1])}
    values = graph_values(nodes, constants)
    assert values.value("zeros") is None
    fits = values.value("fits")
    assert fits is not None and fits.shape == (n - 1,) and fits.dtype == np.float32  # ONNX default
