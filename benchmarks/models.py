"""Large benchmark models for ``bench_analyze.py``.

Two models are produced (and cached on disk, see ``CACHE_DIR``):

* ``resnet50``  -- a torchvision-style ResNet-50 (Bottleneck blocks [3, 4, 6, 3],
  1x3x224x224 input) written in plain torch and exported with the TorchScript
  exporter.  Without torch, falls back to ``light_resnet50.onnx`` that ships in
  the ``onnx`` package's backend test data, with its ``ConstantOfShape``
  weight generators replaced by random initializers.
* ``chain10k``  -- a >= 10,000-node graph written directly with ``onnx.helper``:
  a long chain of conv-bn-relu residual blocks with an occasional
  Concat + 1x1 conv, on a tiny 1x16x8x8 activation.

Only ``onnx`` and ``numpy`` are imported at module level; torch is imported
lazily so that the ``chain10k`` model (and the fallback) work without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"

# Bump when the generated graphs change so that stale cache files are not reused.
MODEL_VERSION = 2


def ensure_cache_dir(cache_dir: Path | str = CACHE_DIR) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    gi = cache_dir / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")
    return cache_dir


# --------------------------------------------------------------------------
# (a) ResNet-50
# --------------------------------------------------------------------------


def _build_torch_resnet50():
    """torchvision.models.resnet50() architecture, re-written without torchvision."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
            super().__init__()
            width = planes
            self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(64, layers[0])
            self.layer2 = self._make_layer(128, layers[1], stride=2)
            self.layer3 = self._make_layer(256, layers[2], stride=2)
            self.layer4 = self._make_layer(512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, planes: int, blocks: int, stride: int = 1):
            downsample = None
            if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(
                        self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                    ),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * Bottleneck.expansion
            layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return ResNet()


def _export_torch_resnet50(path: Path) -> None:
    import warnings

    import torch

    model = _build_torch_resnet50()
    x = torch.randn(1, 3, 224, 224)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(tmp),
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )
    os.replace(tmp, path)


def _light_resnet50_with_weights(path: Path, seed: int = 0) -> None:
    """onnx's backend-test ``light_resnet50.onnx`` with real (random) initializers.

    The light model stores every weight as ``ConstantOfShape(shape_initializer)``;
    each such node is replaced by a random initializer of that shape.
    """
    src = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    m = onnx.load(str(src))
    g = m.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in g.initializer}
    drop_inits: set[str] = set()
    new_inits = []
    keep_nodes = []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            name = node.output[0]
            if name.endswith(("_riv_0", "_var_0")):  # BN running variance
                arr = rng.uniform(0.5, 1.5, shape)
            elif name.endswith("_s_0"):  # BN scale
                arr = rng.normal(1.0, 0.1, shape)
            elif name.endswith(("_b_0", "_rm_0")):  # biases, running mean
                arr = rng.normal(0.0, 0.05, shape)
            else:  # conv / fc weights
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                arr = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
            new_inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
            drop_inits.add(node.input[0])
        else:
            keep_nodes.append(node)
    del g.node[:]
    g.node.extend(keep_nodes)
    kept = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    init_names = {t.name for t in g.initializer}
    # Old IR: initializers also listed as graph inputs.  Drop removed shape
    # inputs, add the new weights so the model stays IR-3 consistent.
    ins = [i for i in g.input if i.name not in drop_inits]
    have = {i.name for i in ins}
    for t in new_inits:
        if t.name not in have:
            ins.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.input[:]
    g.input.extend(ins)
    assert all(i.name in init_names or i.name == "gpu_0/data_0" for i in g.input)
    onnx.checker.check_model(m)
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)


def resnet50_path(cache_dir: Path | str = CACHE_DIR, force: bool = False, log=print) -> Path:
    cache_dir = ensure_cache_dir(cache_dir)
    try:
        import torch  # noqa: F401

        have_torch = True
    except Exception:  # pragma: no cover - depends on environment
        have_torch = False
    if have_torch:
        path = cache_dir / f"resnet50_torch_v{MODEL_VERSION}.onnx"
        if force or not path.exists():
            log(f"[models] exporting ResNet-50 with torch -> {path}")
            _export_torch_resnet50(path)
    else:
        path = cache_dir / f"resnet50_light_v{MODEL_VERSION}.onnx"
        if force or not path.exists():
            log(f"[models] torch unavailable; building light_resnet50 fallback -> {path}")
            _light_resnet50_with_weights(path)
    return path


def _build_torch_mobilenet_v2():
    """torchvision's MobileNetV2 (width 1.0) in plain torch: inverted residuals with ReLU6."""
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        return nn.Sequential(*layers, *([nn.ReLU6(inplace=True)] if act else []))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
            layers += [
                conv_bn(hidden, hidden, 3, stride, hidden),
                conv_bn(hidden, cout, 1, act=False),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, num_classes: int = 1000):
            super().__init__()
            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
            cfg += [(6, 160, 3, 2), (6, 320, 1, 1)]
            layers, cin = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in cfg:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(1280, num_classes)

        def forward(self, x):
            x = self.features(x).mean((2, 3))
            return self.classifier(x)

    return MobileNetV2()


def mobilenet_v2_path(cache_dir: Path | str = CACHE_DIR, force: bool = False, log=print) -> Path:
    """MobileNetV2 at 1x3x224x224, exported with torch (needs torch)."""
    import warnings

    import torch

    cache_dir = ensure_cache_dir(cache_dir)
    path = cache_dir / f"mobilenet_v2_torch_v{MODEL_VERSION}.onnx"
    if force or not path.exists():
        log(f"[models] exporting MobileNetV2 with torch -> {path}")
        torch.manual_seed(0)
        model = _build_torch_mobilenet_v2().eval()
        tmp = path.with_suffix(".tmp.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.randn(1, 3, 224, 224),),
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
            )
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------
# (b) 10k-node chain
# --------------------------------------------------------------------------


def build_chain_model(
    min_nodes: int = 10_000, channels: int = 16, hw: int = 8, concat_every: int = 8, seed: int = 0
) -> onnx.ModelProto:
    """A deep residual conv-bn-relu chain with at least ``min_nodes`` nodes.

    Residual block (7 nodes)::

        x -> Conv3x3 -> BN -> Relu -> Conv3x3 -> BN -> Add(x) -> Relu

    Every ``concat_every`` blocks a fusion block (4 nodes) follows::

        Concat([x, block_input_k_blocks_ago], axis=1) -> Conv1x1 (2C->C) -> BN -> Relu

    Ends with GlobalAveragePool -> Flatten -> Gemm(C->10).
    Conv weights are He-normal, BN stats are plausible (var > 0) and the
    residual branch's last BN has a small scale, so the output stays finite.
    """
    rng = np.random.default_rng(seed)
    C = channels
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    def conv(prefix: str, x: str, cin: int, cout: int, k: int) -> str:
        w = init(
            f"{prefix}.weight", rng.normal(0.0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))
        )
        y = f"{prefix}.out"
        p = k // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, w],
                [y],
                name=prefix,
                kernel_shape=[k, k],
                pads=[p, p, p, p],
                strides=[1, 1],
                dilations=[1, 1],
                group=1,
            )
        )
        return y

    def bn(prefix: str, x: str, c: int, gamma: float = 1.0) -> str:
        s = init(f"{prefix}.weight", rng.normal(gamma, 0.1 * gamma, c))
        b = init(f"{prefix}.bias", rng.normal(0.0, 0.05, c))
        m = init(f"{prefix}.running_mean", rng.normal(0.0, 0.1, c))
        v = init(f"{prefix}.running_var", rng.uniform(0.5, 1.5, c))
        y = f"{prefix}.out"
        nodes.append(
            helper.make_node(
                "BatchNormalization", [x, s, b, m, v], [y], name=prefix, epsilon=1e-5, momentum=0.9
            )
        )
        return y

    def relu(prefix: str, x: str) -> str:
        y = f"{prefix}.out"
        nodes.append(helper.make_node("Relu", [x], [y], name=prefix))
        return y

    x = "input"
    history = [x]
    tail_nodes = 3
    i = 0
    while len(nodes) + tail_nodes < min_nodes:
        p = f"blocks.{i}"
        h = relu(f"{p}.relu1", bn(f"{p}.bn1", conv(f"{p}.conv1", x, C, C, 3), C))
        # small last-BN gamma (as in trained deep ResNets) keeps 1,400 stacked
        # residual blocks numerically finite under onnxruntime
        h = bn(f"{p}.bn2", conv(f"{p}.conv2", h, C, C, 3), C, gamma=0.05)
        s = f"{p}.add.out"
        nodes.append(helper.make_node("Add", [h, x], [s], name=f"{p}.add"))
        x = relu(f"{p}.relu2", s)
        history.append(x)
        if (i + 1) % concat_every == 0:
            q = f"fuse.{i}"
            cat = f"{q}.concat.out"
            nodes.append(
                helper.make_node(
                    "Concat", [x, history[-1 - concat_every]], [cat], name=f"{q}.concat", axis=1
                )
            )
            x = relu(f"{q}.relu", bn(f"{q}.bn", conv(f"{q}.conv", cat, 2 * C, C, 1), C))
            history.append(x)
        i += 1

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool.out"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool.out"], ["flatten.out"], name="flatten", axis=1))
    fw = init("fc.weight", rng.normal(0.0, np.sqrt(1.0 / C), (10, C)))
    fb = init("fc.bias", np.zeros(10))
    nodes.append(helper.make_node("Gemm", ["flatten.out", fw, fb], ["logits"], name="fc", transB=1))

    graph = helper.make_graph(
        nodes,
        "chain10k",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="morphonnx-benchmarks"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def chain_path(
    cache_dir: Path | str = CACHE_DIR, min_nodes: int = 10_000, force: bool = False, log=print
) -> Path:
    cache_dir = ensure_cache_dir(cache_dir)
    path = cache_dir / f"chain{min_nodes}_v{MODEL_VERSION}.onnx"
    if force or not path.exists():
        log(f"[models] building {min_nodes}-node chain graph -> {path}")
        model = build_chain_model(min_nodes=min_nodes)
        tmp = path.with_suffix(".tmp.onnx")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return path


if __name__ == "__main__":  # quick manual check: python benchmarks/models.py
    import collections

    for p in (resnet50_path(), chain_path()):
        m = onnx.load(str(p))
        onnx.checker.check_model(str(p), full_check=True)
        ops = collections.Counter(n.op_type for n in m.graph.node)
        print(
            f"{p.name}: {len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers, "
            f"{p.stat().st_size / 1e6:.1f} MB, {dict(ops)}"
        )
