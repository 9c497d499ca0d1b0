"""Compact, faithful PyTorch versions of well-known architectures, for the robustness sweep.

Widths and resolutions are small (each exports and runs in well under a second), but every
structural feature a channel pruner meets in the real model is there: ShuffleNetV2's channel split
(``chunk``) and shuffle, EfficientNet's MBConv with SiLU and squeeze-excite, MobileNetV3's hard
activations, ResNeXt's grouped bottleneck, a ViT with attention, YOLOv8 (C2f with ``chunk`` or
``split``, SPPF, nearest upsampling, multi-scale heads; and the -cls backbone), a UNet with
transposed convs and skip concats (and milesial's ``F.pad`` to the skip's size), DeepLab's ASPP, a
DenseNet-BC, a RegNetY, PReLU / InstanceNorm / GroupNorm, and a channels-last (NHWC) model with a
ConvNeXt block and a SwiGLU.

Each model is built by a zero-argument factory in :data:`ZOO` (seeded weights, every norm given
distinct random parameters so the exporter keeps one initializer per parameter), with its input
shape in :data:`ZOO_INPUTS`. :func:`fold_shape_computations` does to an export what onnxsim does
to shape arithmetic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

# --------------------------------------------------------------------------- building blocks


def cbr(
    cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, d: int = 1, act: type = nn.ReLU
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> activation, 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, padding=d * (k // 2), dilation=d, groups=g, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


def cb(cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm, no activation (a projection)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, padding=k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)
    )


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce (bias) -> act -> 1x1 expand (bias) -> gate -> scale."""

    def __init__(
        self, channels: int, hidden: int, act: type = nn.ReLU, gate: type = nn.Sigmoid
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> Linear."""

    def __init__(self, cin: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits the channels in half (chunk) and transforms one half;
    stride 2 transforms the whole input in two branches. Concat, then channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(cb(cin, cin, 3, stride, g=cin), cbr(cin, half, 1))
        b2_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            cbr(b2_in, half, 1), cb(half, half, 3, stride, g=half), cbr(half, half, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 12, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        units: list[nn.Module] = []
        cin = 12
        for cout, repeats in ((24, 2), (48, 2)):
            units.append(ShuffleUnit(cin, cout, 2))
            units += [ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1)]
            cin = cout
        self.units = nn.Sequential(*units)
        self.conv5 = cbr(cin, 64, 1)
        self.head = ClassifierHead(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv5(self.units(self.pool(self.stem(x)))))


# --------------------------------------------------------------------------- EfficientNet-B0


class MBConv(nn.Module):
    """Inverted residual: expand 1x1 (SiLU) -> depthwise kxk (SiLU) -> SE (SiLU, sigmoid) ->
    project 1x1; residual when shapes allow."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, expand: int, act: type = nn.SiLU
    ) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = cbr(cin, mid, 1, act=act) if expand != 1 else nn.Identity()
        self.dw = cbr(mid, mid, k, stride, g=mid, act=act)
        self.se = SqueezeExcite(mid, max(1, cin // 4), act=act)
        self.project = cb(mid, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


class EfficientNetB0(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2, act=nn.SiLU)
        # (expand, cout, repeats, stride, kernel) as in B0's stages 1-4, widths scaled down
        cfg = [(1, 8, 1, 1, 3), (6, 12, 2, 2, 3), (6, 16, 2, 2, 5), (6, 24, 1, 1, 3)]
        blocks: list[nn.Module] = []
        cin = 16
        for expand, cout, repeats, stride, k in cfg:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = cbr(cin, 64, 1, act=nn.SiLU)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


# --------------------------------------------------------------------------- MobileNetV3


class V3Block(nn.Module):
    """MobileNetV3 bneck: expand 1x1 -> depthwise -> optional SE (ReLU, hardsigmoid) ->
    project 1x1; activation ReLU or hardswish."""

    def __init__(self, cin: int, mid: int, cout: int, k: int, s: int, se: bool, hs: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.expand = cbr(cin, mid, 1, act=act) if mid != cin else nn.Identity()
        self.dw = cbr(mid, mid, k, s, g=mid, act=act)
        self.se = SqueezeExcite(mid, _make_divisible(mid // 4), gate=nn.Hardsigmoid) if se else None
        self.project = cb(mid, cout)
        self.residual = s == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(self.expand(x))
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.residual else out


def _make_divisible(v: int, d: int = 4) -> int:
    return max(d, int(v + d / 2) // d * d)


class MobileNetV3Small(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 8, 3, 2, act=nn.Hardswish)
        cfg = [  # cin, mid, cout, k, s, se, hardswish (MobileNetV3-Small's first rows, halved)
            (8, 8, 8, 3, 2, True, False),
            (8, 36, 12, 3, 2, False, False),
            (12, 44, 12, 3, 1, False, False),
            (12, 48, 20, 5, 2, True, True),
            (20, 120, 20, 5, 1, True, True),
        ]
        self.blocks = nn.Sequential(*(V3Block(*row) for row in cfg))
        self.last = cbr(20, 64, 1, act=nn.Hardswish)
        self.fc1 = nn.Linear(64, 96)
        self.act = nn.Hardswish()
        self.fc2 = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- ResNeXt


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> 3x3 grouped (cardinality groups) -> 1x1 expand, residual (1x1 shortcut)."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int) -> None:
        super().__init__()
        self.conv1 = cbr(cin, width, 1)
        self.conv2 = cbr(width, width, 3, stride, g=groups)
        self.conv3 = cb(width, cout)
        self.short = cb(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.short is None else self.short(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNeXt(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.layer1 = nn.Sequential(
            ResNeXtBottleneck(16, 32, 32, groups=8, stride=1),
            ResNeXtBottleneck(32, 32, 32, groups=8, stride=1),
        )
        self.layer2 = ResNeXtBottleneck(32, 64, 64, groups=32, stride=2)
        self.head = ClassifierHead(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear, scaled dot product (MatMul, Softmax), proj."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)

    def matmul_macs(self, x: torch.Tensor) -> int:
        """MACs of the two activation-by-activation MatMuls (no module counts them)."""
        b, n, c = x.shape
        return 2 * b * n * n * c


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        n = (32 // 4) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- YOLOv8


class YConv(nn.Module):
    """YOLOv8's Conv: conv (no bias) -> BN -> SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class YBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = YConv(c, c, 3)
        self.cv2 = YConv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 -> chunk(2) -> n bottlenecks on the last chunk, each output kept -> concat -> cv2.
    ``split``: Ultralytics' ``forward_split`` (``split((c, c), 1)``, a Split with constant sizes)
    instead of ``forward`` (``chunk(2, 1)``, Slices with bounds computed from the shape)."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.split = False
        self.c = cout // 2
        self.cv1 = YConv(cin, 2 * self.c)
        self.cv2 = YConv((2 + n) * self.c, cout)
        self.m = nn.ModuleList(YBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.cv1(x)
        y = list(z.split((self.c, self.c), 1) if self.split else z.chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """cv1 -> three chained 5x5 max pools -> concat of all four -> cv2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        c = cin // 2
        self.cv1 = YConv(cin, c)
        self.cv2 = YConv(4 * c, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class YOLOv8(nn.Module):
    """Backbone (P3-P5) + PAN neck + decoupled detect heads (box and class convs per scale)."""

    def __init__(self, classes: int = 4, reg_max: int = 4, split: bool = False) -> None:
        super().__init__()
        w = 8
        self.b0 = YConv(3, w, 3, 2)  # P1
        self.b1 = YConv(w, 2 * w, 3, 2)  # P2
        self.b2 = C2f(2 * w, 2 * w, 1, True)
        self.b3 = YConv(2 * w, 4 * w, 3, 2)  # P3
        self.b4 = C2f(4 * w, 4 * w, 2, True)
        self.b5 = YConv(4 * w, 8 * w, 3, 2)  # P4
        self.b6 = C2f(8 * w, 8 * w, 1, True)
        self.b7 = YConv(8 * w, 8 * w, 3, 2)  # P5
        self.b8 = C2f(8 * w, 8 * w, 1, True)
        self.b9 = SPPF(8 * w, 8 * w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n12 = C2f(16 * w, 8 * w)
        self.n15 = C2f(12 * w, 4 * w)  # P3 out
        self.n16 = YConv(4 * w, 4 * w, 3, 2)
        self.n18 = C2f(12 * w, 8 * w)  # P4 out
        self.n19 = YConv(8 * w, 8 * w, 3, 2)
        self.n21 = C2f(16 * w, 8 * w)  # P5 out
        self.box = nn.ModuleList(self._head(c, 4 * reg_max, 16) for c in (4 * w, 8 * w, 8 * w))
        self.cls = nn.ModuleList(self._head(c, classes, 16) for c in (4 * w, 8 * w, 8 * w))
        for m in self.modules():
            if isinstance(m, C2f):
                m.split = split

    @staticmethod
    def _head(cin: int, cout: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(
            YConv(cin, hidden, 3), YConv(hidden, hidden, 3), nn.Conv2d(hidden, cout, 1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        h4 = self.n12(torch.cat((self.up(p5), p4), 1))
        o3 = self.n15(torch.cat((self.up(h4), p3), 1))
        o4 = self.n18(torch.cat((self.n16(o3), h4), 1))
        o5 = self.n21(torch.cat((self.n19(o4), p5), 1))
        return tuple(
            torch.cat((box(o), cls(o)), 1)
            for o, box, cls in zip((o3, o4, o5), self.box, self.cls, strict=True)
        )


class YOLOv8Cls(nn.Module):
    """YOLOv8-cls: the backbone (C2f stages with ``chunk``) and the Classify head (1x1 conv ->
    pool -> Linear); no upsampling."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        w = 8
        self.body = nn.Sequential(
            YConv(3, w, 3, 2),
            YConv(w, 2 * w, 3, 2),
            C2f(2 * w, 2 * w, 1, True),
            YConv(2 * w, 4 * w, 3, 2),
            C2f(4 * w, 4 * w, 2, True),
        )
        self.conv = YConv(4 * w, 64)
        self.head = ClassifierHead(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.body(x)))


# --------------------------------------------------------------------------- UNet


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cbr(cin, cout), cbr(cout, cout))


class UNet(nn.Module):
    """Encoder (double conv, max pool) x3, bottleneck, decoder (ConvTranspose 2x2 stride 2,
    concat with the skip, double conv) x3, 1x1 conv to class maps. ``pad``: as the popular
    milesial/Pytorch-UNet, the upsampled map is padded (``F.pad``) to its skip's size, which
    odd sizes need."""

    def __init__(self, classes: int = 3, w: int = 8, pad: bool = False) -> None:
        super().__init__()
        self.pad = pad
        self.enc = nn.ModuleList([DoubleConv(3, w), DoubleConv(w, 2 * w), DoubleConv(2 * w, 4 * w)])
        self.pool = nn.MaxPool2d(2)
        self.mid = DoubleConv(4 * w, 8 * w)
        chans = [8 * w, 4 * w, 2 * w, w]
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i], chans[i + 1], 2, stride=2) for i in range(3)
        )
        self.dec = nn.ModuleList(DoubleConv(2 * chans[i + 1], chans[i + 1]) for i in range(3))
        self.out = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.enc:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            y = up(x)
            if self.pad:
                dy, dx = skip.size(2) - y.size(2), skip.size(3) - y.size(3)
                y = F.pad(y, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = dec(torch.cat((y, skip), 1))
        return self.out(x)


# --------------------------------------------------------------------------- DeepLab ASPP


class ASPP(nn.Module):
    """1x1 conv + three dilated 3x3 convs + image pooling (global pool -> 1x1 -> bilinear back
    up), concatenated and projected."""

    def __init__(self, cin: int, c: int, rates: tuple[int, ...] = (2, 4, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([cbr(cin, c, 1)] + [cbr(cin, c, 3, d=r) for r in rates])
        self.pool_conv = cbr(cin, c, 1)
        self.project = cbr(c * (len(rates) + 2), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, 1))


class DeepLabV3(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            cbr(3, 16, 3, 2), cbr(16, 24, 3, 2), cbr(24, 32, 3, 1, d=2), cbr(32, 32, 3, 1, d=2)
        )
        self.aspp = ASPP(32, 16)
        self.head = nn.Sequential(cbr(16, 16, 3), nn.Conv2d(16, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.aspp(self.backbone(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- DenseNet-BC


class DenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 (4k) -> BN -> ReLU -> 3x3 (k), concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return torch.cat((x, self.conv2(F.relu(self.norm2(y)))), 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2)
        )


class DenseNetBC(nn.Module):
    def __init__(self, classes: int = 10, growth: int = 6) -> None:
        super().__init__()
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for block in range(2):
            for _ in range(3):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block == 0:
                layers.append(Transition(c, c // 2))  # compression 0.5
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- RegNetY


class RegNetYBlock(nn.Module):
    """1x1 -> 3x3 grouped (group width gw) -> SE (squeeze from the block's input width) -> 1x1,
    residual (1x1 shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, gw: int) -> None:
        super().__init__()
        self.a = cbr(cin, cout, 1)
        self.b = cbr(cout, cout, 3, stride, g=cout // gw)
        self.se = SqueezeExcite(cout, max(1, cin // 4))
        self.c = cb(cout, cout)
        self.short = cb(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.short is None else self.short(x)
        return self.relu(self.c(self.se(self.b(self.a(x)))) + identity)


class RegNetY(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.s1 = nn.Sequential(RegNetYBlock(16, 24, 2, 8), RegNetYBlock(24, 24, 1, 8))
        self.s2 = nn.Sequential(RegNetYBlock(24, 48, 2, 8), RegNetYBlock(48, 48, 1, 8))
        self.head = ClassifierHead(48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.s2(self.s1(self.stem(x))))


# --------------------------------------------------------------------------- norms / PReLU


class NormZoo(nn.Module):
    """PReLU (per channel and shared), InstanceNorm (affine and not), GroupNorm."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.a1 = nn.PReLU(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.n2 = nn.InstanceNorm2d(16, affine=True)
        self.c3 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.n3 = nn.GroupNorm(4, 24)
        self.c4 = nn.Conv2d(24, 24, 3, padding=1)
        self.n4 = nn.InstanceNorm2d(24)
        self.a4 = nn.PReLU()
        self.c5 = nn.Conv2d(24, 32, 1)
        self.a5 = nn.PReLU(32)
        self.head = ClassifierHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.c1(x))
        x = F.relu(self.n2(self.c2(x)))
        x = F.relu(self.n3(self.c3(x)))
        x = self.a4(self.n4(self.c4(x)))
        return self.head(self.a5(self.c5(x)))


# --------------------------------------------------------------------------- NHWC


class ChannelsLastMLP(nn.Module):
    """Permute to NHWC, Linear over channels (MatMul), GELU, Linear back, permute to NCHW."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        return y.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> NHWC -> LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale ->
    NCHW, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.fc2(F.gelu(self.fc1(y)))
        return x + y.permute(0, 3, 1, 2)


class SwiGLU(nn.Module):
    """Gated MLP over the last axis (LLaMA-style): Linear to 2H, ``chunk(2, -1)``, a * SiLU(b),
    Linear back."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, 2 * hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(a * F.silu(b))


class NHWCNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.mlp = ChannelsLastMLP(16, 24)
        self.glu = SwiGLU(16, 12)
        self.conv = cbr(16, 24, 3, 2)
        self.block = ConvNeXtBlock(24)
        self.head = ClassifierHead(24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.mlp(x))
        x = x + self.glu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.block(self.conv(x)))


# --------------------------------------------------------------------------- registry


_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct random affine parameters and running stats for every norm layer (fresh ones are
    all ones / zeros, which the exporter would de-duplicate and which hide slicing bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _NORMS):
                continue
            for name in ("weight", "running_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            for name in ("bias", "running_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


_CLASSES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "shufflenet_v2": (ShuffleNetV2, (3, 32, 32)),
    "efficientnet_b0": (EfficientNetB0, (3, 32, 32)),
    "mobilenet_v3": (MobileNetV3Small, (3, 32, 32)),
    "resnext": (ResNeXt, (3, 16, 16)),
    "vit": (TinyViT, (3, 32, 32)),
    "yolov8": (YOLOv8, (3, 64, 64)),
    "yolov8_split": (functools.partial(YOLOv8, split=True), (3, 64, 64)),
    "yolov8_cls": (YOLOv8Cls, (3, 32, 32)),
    "unet": (UNet, (3, 32, 32)),
    "unet_pad": (functools.partial(UNet, pad=True), (3, 36, 36)),
    "deeplab_aspp": (DeepLabV3, (3, 32, 32)),
    "densenet_bc": (DenseNetBC, (3, 16, 16)),
    "regnet_y": (RegNetY, (3, 32, 32)),
    "norm_zoo": (NormZoo, (3, 16, 16)),
    "nhwc": (NHWCNet, (3, 16, 16)),
}

ZOO_INPUTS: dict[str, tuple[int, ...]] = {k: v[1] for k, v in _CLASSES.items()}
"""Per-sample input shape (C, H, W) of each zoo model."""


def build(name: str, seed: int = 0) -> nn.Module:
    """Model ``name`` with seeded weights and randomized norms, in eval mode."""
    torch.manual_seed(seed)
    model = _CLASSES[name][0]()
    return randomize_norms(model, seed + 1).eval()


def example(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, *ZOO_INPUTS[name], generator=g)


ZOO: dict[str, Callable[[], nn.Module]] = {
    name: (lambda name=name: build(name))
    for name in _CLASSES  # type: ignore[misc]
}
"""Name -> zero-argument factory of a fresh, deterministic, eval-mode model."""


def extra_matmul_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of MatMuls between activations (attention), which no Linear/Conv hook sees: every
    module that can count them has a ``matmul_macs(input)`` method."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        nonlocal total
        total += module.matmul_macs(inputs[0])  # type: ignore[operator]

    counting = [m for m in model.modules() if hasattr(m, "matmul_macs")]
    handles = [m.register_forward_hook(hook) for m in counting]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


__all__ = [
    "ZOO",
    "ZOO_INPUTS",
    "build",
    "example",
    "extra_matmul_macs",
    "fold_shape_computations",
]


def fold_shape_computations(src: str | Path, dst: str | Path) -> None:
    """What onnxsim / onnxslim do to an export with static shapes: every value computed from
    tensor shapes and small constants (Shape -> Gather -> Div -> Slice bounds, Resize sizes,
    Expand shapes) becomes an initializer, and the nodes that computed it go away."""
    model = onnx.load(str(src))
    g = model.graph
    known = {t.name for t in g.initializer if math.prod(t.dims) <= 64}
    nodes = list(g.node)
    folded = [False] * len(nodes)
    for i, n in enumerate(nodes):
        if n.op_type in ("Shape", "Size", "Constant") or (
            n.input and all(not t or t in known for t in n.input)
        ):
            known.update(n.output)
            folded[i] = True
    consumers = {t for n, f in zip(nodes, folded, strict=True) if not f for t in n.input}
    consumers.update(o.name for o in g.output)
    frontier = [t for n, f in zip(nodes, folded, strict=True) if f for t in n.output]
    frontier = [t for t in frontier if t in consumers]
    values = _values_of(model, frontier) if frontier else []
    keep = [n for n, f in zip(nodes, folded, strict=True) if not f]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(
        numpy_helper.from_array(v, t) for t, v in zip(frontier, values, strict=True)
    )
    used = {t for n in g.node for t in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    onnx.save(model, str(dst))


def _values_of(model: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    """Values of tensors ``names`` of ``model`` (shape computations: any input will do)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.ValueInfoProto(name=t) for t in names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, ["CPUExecutionProvider"])
    inits = {t.name for t in model.graph.initializer}
    feeds = {
        i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
        for i in model.graph.input
        if i.name not in inits
    }
    return [np.asarray(v) for v in sess.run(names, feeds)]
