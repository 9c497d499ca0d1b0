"""Build the demo model the README analyses: ``models/tiny_resnet.onnx``.

A small seeded ResNet (stem, three basic blocks, one stride-2 with a 1x1 downsample
shortcut, global pool, Linear) exported with BatchNormalization kept, so MorphNet BN
gammas are present. Input ``input`` 1x3x32x32, output ``logits`` (1x10).

Deterministic: fixed seeds for weights and BN statistics; BN stats are randomized so
each BN has its own named initializers (the exporter de-duplicates identical tensors).

Usage (from the repository root): ``python models/make_models.py``  (needs torch).
The architecture is defined here on purpose: the script must not depend on tests/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MODELS_DIR.parent))  # the checkout's morphonnx, installed or not

from morphonnx.adapters.torch import export_onnx  # noqa: E402

SEED = 0


class Block(nn.Module):
    """ResNet basic block with an optional 1x1 conv+BN projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class DemoResNet(nn.Module):
    """16 -> 16 -> 32 (stride 2) -> 32 channels; about 39k parameters (~160 KB ONNX)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = Block(width, width)
        self.layer2 = Block(width, 2 * width, stride=2)
        self.layer3 = Block(2 * width, 2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(seed: int = SEED) -> nn.Module:
    """Seeded weights plus distinct, varied BN parameters/statistics (some gammas near 0)."""
    torch.manual_seed(seed)
    model = DemoResNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5)  # a spread of gammas
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def main() -> None:
    out = MODELS_DIR / "tiny_resnet.onnx"
    model = build()
    export_onnx(
        model,
        torch.zeros(1, 3, 32, 32),
        out,
        input_names=["input"],
        output_names=["logits"],
    )
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
