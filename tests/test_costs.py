"""Tests for morphonnx.costs: MACs, FLOPs, params, bytes and roofline latency.

Three independent yardsticks:
- counts worked out by hand for tiny ``onnx.helper`` graphs (the arithmetic is in the comments);
- PyTorch forward hooks (``torch_models.torch_macs_params``) on exported tiny architectures;
- ``independent_count.count_macs_params`` (shapes measured with onnxruntime) on the nine
  model-zoo graphs that ship with the ``onnx`` package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from independent_count import count_macs_params  # noqa: E402
from light_models import light_model_paths  # noqa: E402
from onnx import TensorProto, helper, numpy_helper

from morphonnx.costs import OpCost, op_costs, totals
from morphonnx.devices import Device, resolve_device
from morphonnx.graph import Graph
from morphonnx.load import load_graph

F32 = 4  # bytes per float32 element
SOURCE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------- helpers


def _init(name: str, shape: Sequence[int], dtype: type = np.float32, seed: int = 0):
    arr = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(arr, name)


def _save(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inputs: dict[str, Sequence[int | str]],
    outputs: Sequence[str],
    inits: Sequence[onnx.TensorProto] = (),
    *,
    elem: int = TensorProto.FLOAT,
    opset: int = 17,
    name: str = "m.onnx",
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, elem, list(v)) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, elem, None) for o in outputs],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _one(tmp_path: Path, *args, **kwargs) -> tuple[Graph, OpCost]:
    """Load a one-node graph and return it with that node's cost."""
    graph = load_graph(_save(tmp_path, *args, **kwargs))
    costs = op_costs(graph)
    assert len(costs) == 1
    return graph, costs[0]


def _check(cost: OpCost, *, macs: int, params: int, elements: int, itemsize: int = F32) -> None:
    assert cost.macs == macs
    assert cost.flops == 2 * macs
    assert cost.params == params
    assert cost.elements == elements
    assert cost.bytes == elements * itemsize


# --------------------------------------------------------------------------- by hand


def test_conv_with_bias_stride_padding(tmp_path: Path) -> None:
    # x 1x3x10x10, W 4x3x3x3, stride 2, pad 1: H_out = (10 + 2 - 3) // 2 + 1 = 5
    node = helper.make_node(
        "Conv",
        ["x", "W", "b"],
        ["y"],
        name="conv",
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )
    graph, c = _one(
        tmp_path, [node], {"x": [1, 3, 10, 10]}, ["y"], [_init("W", [4, 3, 3, 3]), _init("b", [4])]
    )
    assert graph.shape("y") == (1, 4, 5, 5)
    assert (c.name, c.op_type) == ("conv", "Conv")
    # 100 outputs x (3 in-channels x 3 x 3) = 2700; bias adds are free
    # params 4*3*3*3 + 4 = 112; elements: in 300 + out 100 + weights 112
    _check(c, macs=2700, params=112, elements=300 + 100 + 112)


def test_conv_asymmetric_kernel_dilation(tmp_path: Path) -> None:
    # x 2x2x9x12, W 3x2x1x3, dilation (1, 2), pads (0, 1, 0, 1):
    # H_out = 9, W_out = (12 + 2 - (2*(3-1)+1)) + 1 = 10 -> y 2x3x9x10 = 540
    node = helper.make_node(
        "Conv", ["x", "W"], ["y"], name="c", dilations=[1, 2], pads=[0, 1, 0, 1]
    )
    graph, c = _one(tmp_path, [node], {"x": [2, 2, 9, 12]}, ["y"], [_init("W", [3, 2, 1, 3])])
    assert graph.shape("y") == (2, 3, 9, 10)
    _check(c, macs=540 * 6, params=18, elements=432 + 540 + 18)


def test_depthwise_conv(tmp_path: Path) -> None:
    # x 1x8x6x6, W 8x1x3x3, group 8, pad 1 -> y 1x8x6x6 = 288; each output sums 1*3*3 products
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=8, pads=[1, 1, 1, 1])
    graph, c = _one(tmp_path, [node], {"x": [1, 8, 6, 6]}, ["y"], [_init("W", [8, 1, 3, 3])])
    assert graph.shape("y") == (1, 8, 6, 6)
    _check(c, macs=288 * 9, params=72, elements=288 + 288 + 72)


def test_grouped_conv(tmp_path: Path) -> None:
    # x 1x8x6x6, W 12x4x3x3, group 2, no pad -> y 1x12x4x4 = 192; each output: 4*3*3 = 36
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], group=2)
    graph, c = _one(
        tmp_path, [node], {"x": [1, 8, 6, 6]}, ["y"], [_init("W", [12, 4, 3, 3]), _init("b", [12])]
    )
    assert graph.shape("y") == (1, 12, 4, 4)
    _check(c, macs=192 * 36, params=432 + 12, elements=288 + 192 + 444)


def test_conv_transpose(tmp_path: Path) -> None:
    # x 1x4x5x5, W 4x6x3x3 (in, out/group, kh, kw), stride 2 -> y 1x6x11x11 (= (5-1)*2 + 3)
    # every input element is multiplied into 6*3*3 outputs: 100 * 54 = 5400
    node = helper.make_node("ConvTranspose", ["x", "W", "b"], ["y"], strides=[2, 2])
    graph, c = _one(
        tmp_path, [node], {"x": [1, 4, 5, 5]}, ["y"], [_init("W", [4, 6, 3, 3]), _init("b", [6])]
    )
    assert graph.shape("y") == (1, 6, 11, 11)
    _check(c, macs=5400, params=216 + 6, elements=100 + 726 + 222)


def test_grouped_conv_transpose(tmp_path: Path) -> None:
    # x 1x4x3x3, W 4x2x2x2, group 2 -> 4 out channels, y 1x4x4x4; MACs = 36 inputs * 2*2*2
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2)
    graph, c = _one(tmp_path, [node], {"x": [1, 4, 3, 3]}, ["y"], [_init("W", [4, 2, 2, 2])])
    assert graph.shape("y") == (1, 4, 4, 4)
    _check(c, macs=36 * 8, params=32, elements=36 + 64 + 32)


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "a_shape", "b_shape"),
    [
        (0, 0, [3, 6], [6, 5]),
        (1, 0, [6, 3], [6, 5]),
        (0, 1, [3, 6], [5, 6]),
        (1, 1, [6, 3], [5, 6]),
    ],
)
def test_gemm_transposes(
    tmp_path: Path, trans_a: int, trans_b: int, a_shape: list[int], b_shape: list[int]
) -> None:
    # Y (M=3, N=5) = A (M=3, K=6) @ B (K=6, N=5) + C (5): M*N*K = 90 MACs whatever the layouts
    node = helper.make_node("Gemm", ["a", "B", "C"], ["y"], transA=trans_a, transB=trans_b)
    graph, c = _one(tmp_path, [node], {"a": a_shape}, ["y"], [_init("B", b_shape), _init("C", [5])])
    assert graph.shape("y") == (3, 5)
    _check(c, macs=90, params=30 + 5, elements=18 + 15 + 35)


def test_gemm_between_activations(tmp_path: Path) -> None:
    # both operands computed: no params; transA: a is (K=4, M=2), b is (K=4, N=7)
    node = helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)
    _, c = _one(tmp_path, [node], {"a": [4, 2], "b": [4, 7]}, ["y"])
    _check(c, macs=2 * 7 * 4, params=0, elements=8 + 28 + 14)


def test_matmul_constant_weight(tmp_path: Path) -> None:
    # x 2x7x16 @ W 16x8 -> 2x7x8 = 112 outputs, K = 16
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph, c = _one(tmp_path, [node], {"x": [2, 7, 16]}, ["y"], [_init("W", [16, 8])])
    assert graph.shape("y") == (2, 7, 8)
    _check(c, macs=112 * 16, params=128, elements=224 + 112 + 128)


def test_batched_matmul_between_activations(tmp_path: Path) -> None:
    # a 2x3x4x5 @ b 2x3x5x6 -> 2x3x4x6 = 144 outputs, each a K=5 dot product; no params
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph, c = _one(tmp_path, [node], {"a": [2, 3, 4, 5], "b": [2, 3, 5, 6]}, ["y"])
    assert graph.shape("y") == (2, 3, 4, 6)
    _check(c, macs=144 * 5, params=0, elements=120 + 180 + 144)


def test_broadcast_matmul(tmp_path: Path) -> None:
    # a 3x4x5 broadcast against b 2x1x5x6 -> 2x3x4x6 = 144 outputs, K = 5
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph, c = _one(tmp_path, [node], {"a": [3, 4, 5], "b": [2, 1, 5, 6]}, ["y"])
    assert graph.shape("y") == (2, 3, 4, 6)
    _check(c, macs=144 * 5, params=0, elements=60 + 60 + 144)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "y_shape", "macs"),
    [([5], [5, 6], (6,), 30), ([4, 5], [5], (4,), 20), ([5], [5], (), 5)],
)
def test_matmul_vectors(
    tmp_path: Path, a_shape: list[int], b_shape: list[int], y_shape: tuple[int, ...], macs: int
) -> None:
    # 1-D operands (numpy matmul semantics): one multiply-add per (output, K) pair
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph, c = _one(tmp_path, [node], {"a": a_shape, "b": b_shape}, ["y"])
    assert graph.shape("y") == y_shape
    n_in = int(np.prod(a_shape)) + int(np.prod(b_shape))
    _check(c, macs=macs, params=0, elements=n_in + int(np.prod(y_shape)))


def test_elementwise_ops(tmp_path: Path) -> None:
    # Add of two activations: 0 MACs, bytes = 2 inputs + 1 output
    _, c = _one(
        tmp_path,
        [helper.make_node("Add", ["a", "b"], ["y"])],
        {"a": [1, 4, 5, 5], "b": [1, 4, 5, 5]},
        ["y"],
    )
    _check(c, macs=0, params=0, elements=3 * 100)
    # Relu: in + out
    _, c = _one(tmp_path, [helper.make_node("Relu", ["a"], ["y"])], {"a": [2, 3, 7]}, ["y"])
    _check(c, macs=0, params=0, elements=2 * 42)
    # Mul by a broadcast per-channel constant: it is a parameter and read as a weight
    _, c = _one(
        tmp_path,
        [helper.make_node("Mul", ["a", "s"], ["y"])],
        {"a": [1, 4, 5, 5]},
        ["y"],
        [_init("s", [4, 1, 1])],
    )
    _check(c, macs=0, params=4, elements=100 + 100 + 4)


def test_float16_bytes(tmp_path: Path) -> None:
    # same conv arithmetic as above, but every tensor is 2 bytes wide
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    _, c = _one(
        tmp_path,
        [node],
        {"x": [1, 3, 8, 8]},
        ["y"],
        [_init("W", [4, 3, 3, 3], np.float16)],
        elem=TensorProto.FLOAT16,
    )
    _check(c, macs=256 * 27, params=108, elements=192 + 256 + 108, itemsize=2)


def test_shape_constants_are_not_params(tmp_path: Path) -> None:
    # Reshape's int64 shape vector is neither a parameter nor counted in bytes
    shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "shape")
    _, c = _one(
        tmp_path,
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        {"x": [1, 4, 3, 3]},
        ["y"],
        [shape],
    )
    _check(c, macs=0, params=0, elements=36 + 36)


def test_costs_in_graph_order_and_totals(tmp_path: Path) -> None:
    # Conv -> Relu -> Flatten -> Gemm: totals add up per-op MACs, count each weight once
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wfc", "bfc"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("W", [8, 3, 3, 3]), _init("b", [8]), _init("Wfc", [10, 512]), _init("bfc", [10])]
    graph = load_graph(_save(tmp_path, nodes, {"x": [1, 3, 8, 8]}, ["y"], inits))
    costs = op_costs(graph)
    assert [c.name for c in costs] == ["conv", "relu", "flatten", "fc"]
    assert [c.macs for c in costs] == [512 * 27, 0, 0, 10 * 512]
    v100, p100 = resolve_device("V100"), resolve_device("P100")
    t = totals(graph, costs, [v100, p100])
    assert t.macs == 512 * 27 + 5120
    assert t.flops == 2 * t.macs
    assert t.params == 216 + 8 + 5120 + 10
    assert t.weight_bytes == t.params * F32
    assert set(t.latency) == {"V100", "P100"}
    for dev in (v100, p100):
        assert t.latency[dev.name] == pytest.approx(sum(c.latency(dev) for c in costs))


def test_shared_weight_counts_once_in_totals(tmp_path: Path) -> None:
    # the same W used by two MatMuls: 2x the MACs, 1x the params
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["y"]),
    ]
    graph = load_graph(_save(tmp_path, nodes, {"x": [3, 6]}, ["y"], [_init("W", [6, 6])]))
    costs = op_costs(graph)
    assert [c.params for c in costs] == [36, 36]
    t = totals(graph, costs, [])
    assert t.macs == 2 * 3 * 6 * 6
    assert t.params == 36


def _model_proto(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def test_tied_weight_read_directly_and_through_a_view(tmp_path: Path) -> None:
    # tied embeddings: Gather(W, ids) and MatMul(h, Transpose(W)); W has 100x16 = 1600 params
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["h"], name="embed"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="tie", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Wt"], ["y"], name="head"),
    ]
    graph_proto = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[_init("W", [100, 16])],
    )
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", 17)]), path)
    graph = load_graph(path)
    costs = {c.name: c for c in op_costs(graph)}
    assert costs["head"].macs == 5 * 100 * 16
    assert costs["tie"].macs == costs["tie"].params == costs["tie"].bytes == 0  # folded away
    t = totals(graph, list(costs.values()))
    assert t.params == 1600
    assert t.weight_bytes == 1600 * F32
    ref = count_macs_params(_model_proto(path))
    assert (t.macs, t.params) == (ref["macs"], ref["params"])


def test_folded_weight_expression_counts_its_sources(tmp_path: Path) -> None:
    # Conv weight = W * s (a folded Mul, e.g. weight norm); bias through Unsqueeze and also
    # used directly: stored params are W (108) + s (1) + b (4), each once
    axes = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["W", "s"], ["Ws"], name="scale"),
        helper.make_node("Conv", ["x", "Ws", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b4"], name="unsq"),
        helper.make_node("Add", ["c", "b4"], ["y"], name="add"),
    ]
    inits = [_init("W", [4, 3, 3, 3]), _init("s", [1], seed=1), _init("b", [4]), axes]
    path = _save(tmp_path, nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    graph = load_graph(path)
    costs = op_costs(graph)
    t = totals(graph, costs)
    assert t.params == 108 + 1 + 4
    ref = count_macs_params(_model_proto(path))
    assert (t.macs, t.params) == (ref["macs"], ref["params"]) == (64 * 4 * 27, 113)


# --------------------------------------------------------------------------- torch cross-check

TORCH_MODELS = [
    "tiny_resnet",
    "tiny_se_resnet",
    "tiny_mobilenet_v2",
    "tiny_densenet",
    "tiny_inception",
    "tiny_grouped_conv",
    "tiny_flatten_head",
]


@pytest.fixture(scope="module")
def torch_mods():
    torch = pytest.importorskip("torch")
    import torch_models

    from morphonnx.adapters.torch import export_onnx

    return torch, torch_models, export_onnx


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_cross_check(tmp_path: Path, torch_mods, name: str) -> None:
    _, torch_models, export_onnx = torch_mods
    model = torch_models.build_model(name)
    x = torch_models.example_input(name, batch=2)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, x, path)
    ref_macs, ref_params = torch_models.torch_macs_params(model, x)

    graph = load_graph(path)
    costs = op_costs(graph)
    source = [c for c in costs if c.op_type in SOURCE_OPS]
    assert source, "no Conv/Gemm/MatMul exported"
    assert sum(c.macs for c in source) == ref_macs
    assert sum(c.params for c in source) == ref_params
    assert all(c.macs == 0 for c in costs if c.op_type not in SOURCE_OPS)
    assert totals(graph, costs).macs == ref_macs


def test_torch_dynamic_batch(tmp_path: Path, torch_mods) -> None:
    _, torch_models, export_onnx = torch_mods
    name = "tiny_mobilenet_v2"
    model = torch_models.build_model(name)
    path = tmp_path / "dyn.onnx"
    export_onnx(model, torch_models.example_input(name, batch=1), path, dynamic_batch=True)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # a symbolic batch dim
    m1 = totals(g1 := load_graph(path), op_costs(g1)).macs
    g4 = load_graph(path, batch=4)
    t4 = totals(g4, op_costs(g4))
    assert t4.macs == 4 * m1
    assert (
        t4.macs
        == torch_models.torch_macs_params(model, torch_models.example_input(name, batch=4))[0]
    )


# --------------------------------------------------------------------------- model zoo


@pytest.mark.parametrize("name", sorted(light_model_paths()))
def test_light_models_match_independent_count(name: str) -> None:
    path = light_model_paths()[name]
    graph = load_graph(path)
    costs = op_costs(graph)
    t = totals(graph, costs, [resolve_device("V100")])
    ref = count_macs_params(onnx.load(str(path)))
    assert t.macs == ref["macs"]
    assert t.params == ref["params"]
    assert t.flops == 2 * ref["macs"]
    per_node = {c.name: c.macs for c in costs}
    for key, macs in ref["per_node"].items():
        if isinstance(key, str):
            assert per_node[key] == macs, key
    assert t.latency["V100"] > 0


def test_light_model_count() -> None:
    assert len(light_model_paths()) == 9


def test_resnet50_reference_macs() -> None:
    # MorphNet's reference count: torchvision ResNet-50 at 224x224 is 4,089,184,256 MACs
    graph = load_graph(light_model_paths()["resnet50"])
    assert totals(graph, op_costs(graph)).macs == 4_089_184_256


# --------------------------------------------------------------------------- roofline by hand


def _user_device(tmp_path: Path) -> Device:
    profile = tmp_path / "edge.json"
    profile.write_text(
        json.dumps(
            {"name": "edge", "peak_gflops": 1000, "mem_bandwidth_gbps": 100, "bytes_per_element": 2}
        )
    )
    return resolve_device(str(profile))


def _roofline(flops: int, nbytes: int, peak: float, bw: float) -> tuple[float, str]:
    compute, memory = flops / peak, nbytes / bw
    return max(compute, memory), "compute" if compute >= memory else "memory"


def _assert_roofline(cost: OpCost, dev: Device, flops: int, elements: int, itemsize: int) -> str:
    nbytes = elements * (dev.bytes_per_element or itemsize)
    want, bound = _roofline(flops, nbytes, dev.peak_flops, dev.mem_bandwidth)
    assert cost.latency(dev) == pytest.approx(want, rel=1e-12)
    assert cost.bound(dev) == bound
    return bound


def test_roofline_compute_bound_conv(tmp_path: Path) -> None:
    # MorphNet's latency example: Inception-V2 Conv2d_2c_3x3, 56x56, 64 -> 192, 3x3, batch 1, fp32
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    _, c = _one(tmp_path, [node], {"x": [1, 64, 56, 56]}, ["y"], [_init("W", [192, 64, 3, 3])])
    macs = 56 * 56 * 192 * 64 * 9  # 346,816,512
    elements = 64 * 3136 + 192 * 3136 + 192 * 64 * 9
    _check(c, macs=macs, params=192 * 64 * 9, elements=elements)
    p100, v100 = resolve_device("P100"), resolve_device("V100")
    # compute: 693,633,024 FLOP / 9.3e12 = 74.6 us; memory: 3,653,632 B / 732e9 = 5.0 us
    assert _assert_roofline(c, p100, 2 * macs, elements, F32) == "compute"
    assert c.latency(p100) == pytest.approx(74.6e-6, rel=1e-3)
    # V100: 693,633,024 / 125e12 = 5.55 us > 3,653,632 / 900e9 = 4.06 us
    assert _assert_roofline(c, v100, 2 * macs, elements, F32) == "compute"
    assert c.latency(v100) == pytest.approx(5.55e-6, rel=1e-3)
    # user profile (1 TFLOP/s, 100 GB/s, 2 bytes/element): compute 693.6 us vs memory
    # 913,408 elements x 2 B / 100e9 = 18.3 us
    edge = _user_device(tmp_path)
    assert _assert_roofline(c, edge, 2 * macs, elements, F32) == "compute"
    assert c.nbytes(edge) == 2 * elements
    assert c.latency(edge) == pytest.approx(2 * macs / 1e12)


def test_roofline_memory_bound_relu_and_thin_conv(tmp_path: Path) -> None:
    p100, v100, edge = resolve_device("P100"), resolve_device("V100"), _user_device(tmp_path)
    # Relu on 1x64x112x112: 0 FLOPs, 2 x 802,816 elements
    relu_node = helper.make_node("Relu", ["x"], ["y"])
    _, relu = _one(tmp_path, [relu_node], {"x": [1, 64, 112, 112]}, ["y"])
    elements = 2 * 64 * 112 * 112
    for dev in (p100, v100, edge):
        assert _assert_roofline(relu, dev, 0, elements, F32) == "memory"
    assert relu.latency(p100) == pytest.approx(elements * 4 / 732e9)
    assert relu.latency(edge) == pytest.approx(elements * 2 / 100e9)

    # 1x1 conv 4 -> 4 on 224x224: 802,816 MACs, elements 2 x 200,704 + 16
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="thin")
    _, thin = _one(
        tmp_path, [node], {"x": [1, 4, 224, 224]}, ["y"], [_init("W", [4, 4, 1, 1])], name="t.onnx"
    )
    macs, elements = 200_704 * 4, 2 * 200_704 + 16
    _check(thin, macs=macs, params=16, elements=elements)
    for dev in (p100, v100, edge):
        assert _assert_roofline(thin, dev, 2 * macs, elements, F32) == "memory"
    # P100: 1,605,632 FLOP / 9.3e12 = 0.17 us < 1,605,696 B / 732e9 = 2.19 us
    assert thin.latency(p100) == pytest.approx(elements * 4 / 732e9)


def test_roofline_bound_depends_on_device(tmp_path: Path) -> None:
    # 3x3 conv 16 -> 16 on 56x56: 35 FLOP/byte sits between the P100 ridge (9300/732 = 12.7)
    # and the V100 ridge (125000/900 = 139): compute-bound on P100, memory-bound on V100
    node = helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    _, c = _one(tmp_path, [node], {"x": [1, 16, 56, 56]}, ["y"], [_init("W", [16, 16, 3, 3])])
    macs, elements = 3136 * 16 * 144, 2 * 16 * 3136 + 2304
    _check(c, macs=macs, params=2304, elements=elements)
    assert _assert_roofline(c, resolve_device("P100"), 2 * macs, elements, F32) == "compute"
    assert _assert_roofline(c, resolve_device("V100"), 2 * macs, elements, F32) == "memory"
    assert c.latency(resolve_device("V100")) == pytest.approx(elements * 4 / 900e9)


# --------------------------------------------------------------------------- --batch


def test_batch_scales_macs_and_activation_bytes(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wfc"], ["y"], name="fc", transB=1),
    ]
    inits = [_init("W", [8, 3, 3, 3]), _init("b", [8]), _init("Wfc", [10, 8])]
    path = _save(tmp_path, nodes, {"x": ["N", 3, 8, 8]}, ["y"], inits)
    g1, g4 = load_graph(path), load_graph(path, batch=4)
    assert g1.shape("y") == (1, 10) and g4.shape("y") == (4, 10)
    c1, c4 = op_costs(g1), op_costs(g4)
    t1, t4 = totals(g1, c1), totals(g4, c4)
    assert t1.macs == 512 * 27 + 80
    assert t4.macs == 4 * t1.macs
    assert t4.params == t1.params == 216 + 8 + 80
    assert t4.weight_bytes == t1.weight_bytes
    for a, b in zip(c1, c4, strict=True):
        assert b.macs == 4 * a.macs
        assert b.params == a.params
        # activations scale with batch, weights do not
        assert b.elements - b.params == 4 * (a.elements - a.params)
