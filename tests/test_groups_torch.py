"""Channel groups of real torch exports: the same architectures, exported the way users do."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from morphonnx.adapters.torch import export_onnx  # noqa: E402
from morphonnx.graph import Graph  # noqa: E402
from morphonnx.groups import Group, Solution, solve  # noqa: E402
from morphonnx.load import load_graph  # noqa: E402
from tests.torch_models import build_model, example_input  # noqa: E402


def _solve(name: str, tmp_path: Path) -> tuple[Graph, Solution]:
    path = tmp_path / f"{name}.onnx"
    export_onnx(build_model(name), example_input(name), path)
    graph = load_graph(path)
    return graph, solve(graph)


def _group_of(sol: Solution, tensor: str, axis: int = 0) -> Group:
    found = [g for g in sol.groups if any(m.tensor == tensor and m.axis == axis for m in g.members)]
    assert len(found) == 1, (tensor, axis, [g.id for g in found])
    return found[0]


def _members(g: Group) -> set[tuple[str, int]]:
    return {(m.tensor, m.axis) for m in g.members}


def test_resnet_residual_stream_is_one_group(tmp_path: Path) -> None:
    _, sol = _solve("tiny_resnet", tmp_path)
    stem = _group_of(sol, "conv1.weight")
    # the stem's channels run through layer1's residual add: its second conv joins the group
    assert {
        ("conv1.weight", 0),
        ("layer1.conv2.weight", 0),
        ("layer1.conv1.weight", 1),
    } <= _members(stem)
    assert ("bn1.weight", 0) in _members(stem) and ("layer1.bn2.weight", 0) in _members(stem)
    assert stem.channels == 8 and stem.prunable
    # layer2 has a projection shortcut: downsample conv, conv2 and layer3's stream are one group
    proj = _group_of(sol, "layer2.downsample.0.weight")
    assert ("layer2.conv2.weight", 0) in _members(proj)
    assert ("layer3.conv2.weight", 0) in _members(proj)
    assert ("fc.weight", 1) in _members(proj) and proj.prunable
    # inner convs of each block are their own groups
    for name in ("layer1.conv1.weight", "layer2.conv1.weight", "layer3.conv1.weight"):
        g = _group_of(sol, name)
        assert g.prunable and len([m for m in g.members if m.role == "producer"]) == 1
    assert not _group_of(sol, "fc.weight").prunable
    assert "graph output" in (_group_of(sol, "fc.weight").reason or "")
    assert "graph input" in (_group_of(sol, "conv1.weight", 1).reason or "")


def test_mobilenet_depthwise_joins_expansion(tmp_path: Path) -> None:
    graph, sol = _solve("tiny_mobilenet_v2", tmp_path)
    depthwise = [n for n in graph.nodes if n.op_type == "Conv" and int(n.attr("group", 1)) > 1]
    assert depthwise
    for node in depthwise:
        g = _group_of(sol, node.inputs[1])
        # the depthwise filters live and die with the channels that feed them
        producer = graph.producer[node.inputs[0]]
        while producer.op_type != "Conv":
            producer = graph.producer[producer.inputs[0]]
        assert (producer.inputs[1], 0) in _members(g)
        assert g.prunable


def test_densenet_concat_groups_stay_separate(tmp_path: Path) -> None:
    graph, sol = _solve("tiny_densenet", tmp_path)
    convs = [n for n in graph.nodes if n.op_type == "Conv" and n.inputs[1].startswith("block1")]
    groups = {_group_of(sol, n.inputs[1]).id for n in convs}
    assert len(groups) == len(convs)  # each dense layer's new features are their own group
    for n in convs:
        g = _group_of(sol, n.inputs[1])
        # every later consumer of the concatenation reads the group on its input axis
        assert any(m.axis == 1 and m.role == "consumer" for m in g.members)
        assert g.prunable


def test_inception_branches_offset_into_next_block(tmp_path: Path) -> None:
    _, sol = _solve("tiny_inception", tmp_path)
    widths = {"inc1.branch1.0.weight": 8, "inc1.branch3.1.0.weight": 12}
    offset = {"inc1.branch1.0.weight": 0, "inc1.branch3.1.0.weight": 8}
    for name, width in widths.items():
        g = _group_of(sol, name)
        assert g.channels == width
        consumer = next(m for m in g.members if m.tensor == "inc2.branch1.0.weight")
        assert consumer.axis == 1
        assert consumer.positions == [[offset[name] + k] for k in range(width)]


def test_flatten_head_blocks(tmp_path: Path) -> None:
    _, sol = _solve("tiny_flatten_head", tmp_path)
    g = _group_of(sol, "conv.weight")
    head = next(m for m in g.members if m.axis == 1 and m.role == "consumer")
    assert len(head.positions) == 8
    assert head.positions[1] == list(range(16, 32))  # channel 1 owns features 16..31 (4x4 map)
