"""One walk over every stored tensor, shared by the loader's external-data check and saving: a
tensor hidden in a subgraph or a TENSORS attribute is checked like an initializer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from morphonnx.errors import MorphonnxError
from morphonnx.load import load_graph
from morphonnx.tensors import all_tensors


def _tensor(name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones((2, 2), np.float32), name)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _model(branch_tensor: onnx.TensorProto) -> onnx.ModelProto:
    """An If whose then-branch holds a Constant (inside a nested If) and whose else-branch holds
    an initializer; a custom node carries a TENSORS attribute."""
    inner = helper.make_graph(
        [helper.make_node("Constant", [], ["deep"], value=branch_tensor)],
        "inner",
        [],
        [helper.make_tensor_value_info("deep", TensorProto.FLOAT, [2, 2])],
    )
    then = helper.make_graph(
        [helper.make_node("If", ["c"], ["t"], then_branch=inner, else_branch=inner)],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["e_init"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 2])],
        [_tensor("e_init")],
    )
    custom = helper.make_node("Thing", ["x"], ["z"], domain="custom")
    custom.attribute.append(helper.make_attribute("tables", [_tensor("t1"), _tensor("t2")]))
    graph = helper.make_graph(
        [
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
            custom,
        ],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2]),
        ],
        [_tensor("top")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_all_tensors_walks_subgraphs_and_tensor_lists() -> None:
    names = {t.name for t in all_tensors(_model(_tensor("branch")).graph)}
    assert names == {"top", "branch", "e_init", "t1", "t2"}


@pytest.mark.parametrize("where", ["deep subgraph", "TENSORS attribute"])
def test_escaping_external_data_anywhere_is_refused(tmp_path: Path, where: str) -> None:
    model = _model(_tensor("branch"))
    if where == "deep subgraph":
        then = _attr(model.graph.node[0], "then_branch").g
        t = _attr(_attr(then.node[0], "then_branch").g.node[0], "value").t
    else:
        t = _attr(model.graph.node[1], "tables").tensors[1]
    (tmp_path / "outside.bin").write_bytes(t.raw_data)
    external_data_helper.set_external_data(t, location="../outside.bin", length=len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(
        MorphonnxError, match=f"tensor '{t.name}' at '../outside.bin' points outside"
    ):
        load_graph(path)
