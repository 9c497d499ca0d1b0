"""Small PyTorch architectures covering the structures a channel pruner must handle.

Each model exports and runs under onnxruntime in well under a second: residual adds
(ResNet), depthwise convs (MobileNetV2), channel concatenation (DenseNet, Inception),
squeeze-excite gating (SE-ResNet), grouped convs, and a conv -> Flatten -> Linear head.

Every BatchNorm is given distinct random statistics/affine params (``randomize_bn``):
the TorchScript exporter de-duplicates identical tensors (e.g. freshly initialised
running stats) into Identity nodes, which would hide the per-layer initializers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ALL_MODELS",
    "INPUT_SHAPES",
    "BasicBlock",
    "SEBlock",
    "TinyDenseNet",
    "TinyFlattenHead",
    "TinyGroupedConvNet",
    "TinyInception",
    "TinyMobileNetV2",
    "TinyResNet",
    "TinySEResNet",
    "build_model",
    "example_input",
    "randomize_bn",
    "torch_macs_params",
]


def conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Conv (no bias: BN supplies it) -> BN -> activation (ReLU unless given)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act if act is not None else nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- ResNet / SE


class SEBlock(nn.Module):
    """Squeeze-excite: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class BasicBlock(nn.Module):
    """ResNet basic block; 1x1 conv+BN shortcut when stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SEBlock(cout) if se else None
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """Stem + 3 basic blocks (one stride-2 with downsample shortcut) + pool + Linear."""

    def __init__(self, num_classes: int = 10, width: int = 8, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width, se=se)
        self.layer2 = BasicBlock(width, 2 * width, stride=2, se=se)
        self.layer3 = BasicBlock(2 * width, 2 * width, se=se)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinySEResNet(TinyResNet):
    """TinyResNet with a squeeze-excite block at the end of every residual branch."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__(num_classes=num_classes, width=width, se=True)


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (groups=channels) -> 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=nn.ReLU6(inplace=True)))
        layers += [
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6(inplace=True)),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class TinyMobileNetV2(nn.Module):
    """Stem + inverted residual blocks (with and without residual) + 1x1 head conv + Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8, 3, stride=1, act=nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, stride=1, expand=1),  # no expansion conv, residual
            InvertedResidual(8, 16, stride=2, expand=4),  # no residual
            InvertedResidual(16, 16, stride=1, expand=4),  # residual
        )
        self.head = conv_bn(16, 32, 1, act=nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN -> ReLU -> 3x3 conv producing ``growth`` channels, concatenated onto the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=False)  # in-place would clobber x, which is concatenated
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], dim=1)


class Transition(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2),
        )


class TinyDenseNet(nn.Module):
    """Stem conv + two dense blocks (3 layers, growth 4) joined by a transition + Linear."""

    def __init__(self, num_classes: int = 10, growth: int = 4, layers: int = 3) -> None:
        super().__init__()
        c = 8
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        block1: list[nn.Module] = []
        for _ in range(layers):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = Transition(c, c // 2)
        c //= 2
        block2: list[nn.Module] = []
        for _ in range(layers):
            block2.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = self.pool(self.relu(self.norm(x)))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- Inception


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1 / 1x1->3x3 / 1x1->5x5 / maxpool->1x1) concatenated."""

    def __init__(
        self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.branch5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), conv_bn(cin, pool_proj, 1)
        )
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1, self.branch3, self.branch5, self.branch_pool]
        return torch.cat([b(x) for b in branches], dim=1)


class TinyInception(nn.Module):
    """Stem + two inception blocks (maxpool between) + pool + Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, stride=2)
        self.inc1 = InceptionBlock(16, 8, 8, 12, 4, 6, 6)  # -> 32 channels
        self.pool1 = nn.MaxPool2d(2)
        self.inc2 = InceptionBlock(self.inc1.out_channels, 12, 8, 16, 4, 8, 8)  # -> 44
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inc2.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc2(self.pool1(self.inc1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- grouped / flatten


class TinyGroupedConvNet(nn.Module):
    """conv-bn-relu -> grouped conv (groups=4) -bn-relu -> conv-bn-relu -> pool -> Linear."""

    def __init__(self, num_classes: int = 10, groups: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 16, 3),
            conv_bn(16, 16, 3, groups=groups),
            conv_bn(16, 32, 3, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyFlattenHead(nn.Module):
    """conv-bn-relu on 8x8 input (stride 2 -> 4x4 map) -> Flatten -> Linear -> ReLU -> Linear.

    Flatten makes channel ``c`` own Linear input features ``c*16 .. c*16+15``.
    """

    def __init__(self, num_classes: int = 10, channels: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(channels * 4 * 4, hidden)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.relu(self.bn(self.conv(x))))
        return self.fc2(self.relu2(self.fc1(x)))


# --------------------------------------------------------------------------- helpers


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm distinct random weight/bias/running_mean/running_var.

    Fresh BNs all share ones/zeros, which the exporter collapses into one initializer
    (plus Identity nodes); distinct values keep one named initializer per parameter and
    make BN numerically non-trivial in the ORT-vs-torch comparison. Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BN_TYPES):
                continue
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            if m.bias is not None:
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            if m.running_var is not None:
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "tiny_resnet": (3, 32, 32),
    "tiny_se_resnet": (3, 32, 32),
    "tiny_mobilenet_v2": (3, 32, 32),
    "tiny_densenet": (3, 32, 32),
    "tiny_inception": (3, 32, 32),
    "tiny_grouped_conv": (3, 32, 32),
    "tiny_flatten_head": (3, 8, 8),
}
"""Per-sample input shape (C, H, W) of each model in ``ALL_MODELS``."""

_CLASSES: dict[str, type[nn.Module]] = {
    "tiny_resnet": TinyResNet,
    "tiny_se_resnet": TinySEResNet,
    "tiny_mobilenet_v2": TinyMobileNetV2,
    "tiny_densenet": TinyDenseNet,
    "tiny_inception": TinyInception,
    "tiny_grouped_conv": TinyGroupedConvNet,
    "tiny_flatten_head": TinyFlattenHead,
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """Deterministically build model ``name`` (seeded weights, randomized BN), in eval mode."""
    torch.manual_seed(seed)
    model = _CLASSES[name]()
    randomize_bn(model, seed=seed + 1)
    return model.eval()


def _factory(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return build_model(name)

    make.__name__ = f"make_{name}"
    return make


ALL_MODELS: dict[str, Callable[[], nn.Module]] = {name: _factory(name) for name in _CLASSES}
"""Name -> zero-argument factory returning a fresh, deterministic, eval-mode model."""


def example_input(name: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic random input of shape ``(batch, *INPUT_SHAPES[name])``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *INPUT_SHAPES[name], generator=g)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def torch_macs_params(
    model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]
) -> tuple[int, int]:
    """Independent (MACs, params) reference count via forward hooks; Conv/Linear only.

    MorphNet convention: only Conv, ConvTranspose and Linear cost anything; bias adds,
    BatchNorm, activations, pooling and elementwise ops count as 0 MACs.

    * Conv:          ``out.numel() * (in_channels / groups) * prod(kernel_size)``
    * ConvTranspose: ``input.numel() * (out_channels / groups) * prod(kernel_size)``
    * Linear:        ``out.numel() * in_features`` (bias excluded)

    ``numel`` includes the batch dimension, so MACs scale with batch size; a module
    called twice counts twice. params = ``weight.numel() + bias.numel()`` of those
    modules (each module once); BN affine params are not counted.
    """
    macs = 0
    counted: set[int] = set()
    params = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs, params
        if isinstance(module, _CONVT_TYPES):
            per = module.out_channels // module.groups * math.prod(module.kernel_size)
            macs += inputs[0].numel() * per
        elif isinstance(module, _CONV_TYPES):
            per = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs += out.numel() * per
        elif isinstance(module, nn.Linear):
            macs += out.numel() * module.in_features
        else:
            return
        if id(module) not in counted:
            counted.add(id(module))
            params += module.weight.numel()
            if module.bias is not None:
                params += module.bias.numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (*_CONV_TYPES, *_CONVT_TYPES, nn.Linear))
    ]
    args = x if isinstance(x, tuple) else (x,)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return macs, params
