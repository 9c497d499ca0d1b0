"""Torch adapter export + the torch reference models and reference MAC counter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402
from torch_models import (  # noqa: E402
    ALL_MODELS,
    example_input,
    randomize_bn,
    torch_macs_params,
)

from morphonnx.adapters.torch import export_onnx, unwrap_model  # noqa: E402

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy()})[0]


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_export_matches_torch_and_keeps_structure(name: str, tmp_path: Path) -> None:
    model = ALL_MODELS[name]()
    x = example_input(name)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, x, path, input_names=["input"], output_names=["logits"])

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run_ort(path, x), expected, atol=1e-4, rtol=1e-4)

    graph = proto.graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]

    n_bn = sum(isinstance(m, _BN_TYPES) for m in model.modules())
    bn_nodes = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == n_bn  # not folded into convs

    keys = set(model.state_dict())
    inits = {i.name for i in graph.initializer}
    weight_nodes = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm")]
    assert weight_nodes
    for node in weight_nodes:
        assert node.input[1] in inits, (node.name, node.input[1])
        assert node.input[1] in keys, (node.name, node.input[1])
    for node in bn_nodes:  # gamma, beta, mean, var all named after their state_dict keys
        assert all(i in keys for i in node.input[1:5]), list(node.input)


def test_single_conv_macs_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    macs, params = torch_macs_params(conv, torch.zeros(1, 3, 8, 8))
    assert macs == 8 * 8 * 8 * 3 * 9  # out H*W*C * (in_ch/groups) * k*k
    assert params == 8 * 3 * 9 + 8


def test_macs_grouped_linear_transpose_and_bn_by_hand() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False),  # 1x8x4x4 out, 1 in-ch/group
        nn.BatchNorm2d(8),  # 0 MACs, params not counted
        nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2),  # in 1x8x4x4, 2 out-ch/group
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    )
    macs, params = torch_macs_params(model, torch.zeros(1, 4, 4, 4))
    assert macs == (8 * 4 * 4) * 1 * 9 + (8 * 4 * 4) * 2 * 4 + 5 * 256
    assert params == 8 * 1 * 9 + (8 * 2 * 4 + 4) + (256 * 5 + 5)
    macs2, _ = torch_macs_params(model, torch.zeros(2, 4, 4, 4))
    assert macs2 == 2 * macs  # numel includes the batch dimension


def test_tiny_resnet_macs_positive_and_training_flag_kept() -> None:
    model = ALL_MODELS["tiny_resnet"]().train()
    macs, params = torch_macs_params(model, example_input("tiny_resnet"))
    assert macs > 0 and params > 0
    assert model.training
    assert params < sum(p.numel() for p in model.parameters())  # BN params excluded


def test_randomize_bn_values_are_distinct() -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)), seed=3)
    tensors = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
    for i, a in enumerate(tensors):
        for b in tensors[i + 1 :]:
            assert not torch.equal(a, b)


def test_export_restores_training_flags_and_unwraps(tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_resnet"]().train()
    model.layer1.eval()  # a deliberately frozen submodule must stay as the caller left it
    x = example_input("tiny_resnet")
    path = tmp_path / "dp.onnx"
    export_onnx(nn.DataParallel(model), x, path)
    assert model.training and not model.layer1.training and model.layer2.training

    graph = onnx.load(str(path)).graph
    keys = set(model.state_dict())
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w in keys for w in conv_weights)  # no "module." prefix
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    assert not any(p.name.startswith(f".{path.name}") for p in tmp_path.iterdir())  # no temp


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_unwrap_compiled_module() -> None:
    model = ALL_MODELS["tiny_flatten_head"]()
    compiled = torch.compile(model)  # wrapping only; nothing compiles until called
    assert unwrap_model(nn.DataParallel(compiled)) is model


def test_export_dynamic_batch_and_tuple_inputs(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x) + self.b(y), self.a(y)

    torch.manual_seed(0)
    model = Two().eval()
    path = tmp_path / "two.onnx"
    export_onnx(model, (torch.randn(1, 4), torch.randn(1, 4)), path, dynamic_batch=True)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_0": x.numpy(), "input_1": y.numpy()})
    with torch.no_grad():
        want = model(x, y)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)


def test_export_overwrites_atomically(tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_flatten_head"]()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(model, example_input("tiny_flatten_head"), path)
    onnx.checker.check_model(onnx.load(str(path)))
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_failed_export_leaves_no_temp_file(tmp_path: Path) -> None:
    model = ALL_MODELS["tiny_flatten_head"]()
    path = tmp_path / "bad.onnx"
    with pytest.raises(Exception):  # noqa: B017 - wrong input shape, any torch error
        export_onnx(model, torch.zeros(1, 3, 5, 5), path)
    assert os.listdir(tmp_path) == []
