"""Architectures from outside torchvision for the robustness sweep, written in code (random
weights, nothing downloaded): compact PyTorch re-implementations of ResNeSt (split attention),
GhostNet, RepVGG (training-time branches), YOLOv5's CSPDarknet (C3, SPPF), a ViT with separate
q/k/v projections, MLP-Mixer, an HRNet-style two-resolution net, ConvNeXt and Res2Net; and Keras
applications (``weights=None``) exported with tf2onnx, whose MACs are counted here from the
Keras layer configs."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zoo_models import ClassifierHead, SqueezeExcite, cb, cbr, randomize_norms

# --------------------------------------------------------------------------- ResNeSt


class SplitAttention(nn.Module):
    """ResNeSt's SplAtConv2d: grouped conv into radix x C, radix parts summed, pooled, fc1 -> BN
    -> ReLU -> fc2 (grouped by cardinality), rSoftmax over the radix axis, weighted sum."""

    def __init__(self, cin: int, c: int, radix: int = 2, card: int = 2, inter: int = 8) -> None:
        super().__init__()
        self.radix, self.card = radix, card
        self.conv = nn.Conv2d(cin, c * radix, 3, padding=1, groups=card * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(c * radix)
        self.fc1 = nn.Conv2d(c, inter, 1, groups=card)
        self.bn1 = nn.BatchNorm2d(inter)
        self.fc2 = nn.Conv2d(inter, c * radix, 1, groups=card)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv(x)))
        b, rc = x.shape[:2]
        splits = torch.split(x, rc // self.radix, dim=1)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        att = self.fc2(F.relu(self.bn1(self.fc1(gap))))
        att = att.view(b, self.card, self.radix, -1).transpose(1, 2)
        att = F.softmax(att, dim=1).reshape(b, -1, 1, 1)
        atts = torch.split(att, rc // self.radix, dim=1)
        return sum(a * s for a, s in zip(atts, splits, strict=True))


class ResNeStBottleneck(nn.Module):
    def __init__(self, cin: int, width: int, cout: int) -> None:
        super().__init__()
        self.reduce = cbr(cin, width, 1)
        self.split = SplitAttention(width, width)
        self.expand = cb(width, cout)
        self.short = cb(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.expand(self.split(self.reduce(x))) + self.short(x))


class ResNeSt(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.blocks = nn.Sequential(ResNeStBottleneck(16, 16, 32), ResNeStBottleneck(32, 16, 32))
        self.head = ClassifierHead(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------- GhostNet


class GhostModule(nn.Module):
    """Primary 1x1 conv -> cheap depthwise 3x3 on it -> concat both, keep the first ``cout``."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.cout = cout
        init = math.ceil(cout / 2)
        act: type = nn.ReLU if relu else nn.Identity
        self.primary = cbr(cin, init, 1, act=act)
        self.cheap = cbr(init, init, 3, g=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], dim=1)[:, : self.cout]


class GhostBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.dw = cb(mid, mid, 3, stride, g=mid) if stride > 1 else nn.Identity()
        self.se = SqueezeExcite(mid, max(mid // 4, 4)) if se else nn.Identity()
        self.ghost2 = GhostModule(mid, cout, relu=False)
        if stride == 1 and cin == cout:
            self.short: nn.Module = nn.Identity()
        else:
            self.short = nn.Sequential(cb(cin, cin, 3, stride, g=cin), cb(cin, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.short(x)


class GhostNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            GhostBottleneck(16, 16, 16, 1, False),
            GhostBottleneck(16, 48, 24, 2, False),
            GhostBottleneck(24, 72, 24, 1, True),
        )
        self.conv = cbr(24, 64, 1)
        self.head = ClassifierHead(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.blocks(self.stem(x))))


# --------------------------------------------------------------------------- RepVGG


class RepVGGBlock(nn.Module):
    """Training-time RepVGG: 3x3 conv-BN + 1x1 conv-BN (+ identity BN when shapes allow), summed,
    ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dense = cb(cin, cout, 3, stride)
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class RepVGG(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        widths = [(3, 16, 2), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1)]
        self.body = nn.Sequential(*(RepVGGBlock(i, o, s) for i, o, s in widths))
        self.head = ClassifierHead(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------- YOLOv5 CSPDarknet


class V5Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = cbr(c, c, 1, act=nn.SiLU)
        self.cv2 = cbr(c, c, 3, act=nn.SiLU)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convs: cv1 -> bottlenecks, cv2 beside them, concat, cv3."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        h = cout // 2
        self.cv1 = cbr(cin, h, 1, act=nn.SiLU)
        self.cv2 = cbr(cin, h, 1, act=nn.SiLU)
        self.m = nn.Sequential(*(V5Bottleneck(h, shortcut) for _ in range(n)))
        self.cv3 = cbr(2 * h, cout, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class V5SPPF(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        h = cin // 2
        self.cv1 = cbr(cin, h, 1, act=nn.SiLU)
        self.cv2 = cbr(4 * h, cout, 1, act=nn.SiLU)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], dim=1))


class CSPDarknet(nn.Module):
    """YOLOv5's backbone (6x6 stem, C3 stages, SPPF) with a classifier head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            cbr(3, 16, 6, 2, act=nn.SiLU),
            cbr(16, 32, 3, 2, act=nn.SiLU),
            C3(32, 32),
            cbr(32, 64, 3, 2, act=nn.SiLU),
            C3(64, 64, 2),
            V5SPPF(64, 64),
            C3(64, 64, 1, shortcut=False),
        )
        self.head = ClassifierHead(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------- ViT, q/k/v apart


class MHA(nn.Module):
    """Multi-head attention with separate q, k, v Linears (timm-free, as in many repos)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner) for _ in range(3))
        self.out = nn.Linear(inner, dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, n, -1))

    def matmul_macs(self, x: torch.Tensor) -> int:
        b, n, _ = x.shape
        return 2 * b * n * n * self.heads * self.head_dim


class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MHA(dim, heads, head_dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTMHA(nn.Module):
    def __init__(self, classes: int = 10, dim: int = 24) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(MHABlock(dim, 3, 8, 48), MHABlock(dim, 2, 6, 48))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# --------------------------------------------------------------------------- MLP-Mixer


class MixerBlock(nn.Module):
    """Token mixing (MLP over the patch axis, transposed) and channel mixing, pre-LayerNorm."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, channel_hidden), nn.Linear(channel_hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x).transpose(1, 2)
        x = x + self.tok2(F.gelu(self.tok1(y))).transpose(1, 2)
        return x + self.ch2(F.gelu(self.ch1(self.norm2(x))))


class MLPMixer(nn.Module):
    def __init__(self, classes: int = 10, dim: int = 24) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(MixerBlock(16, dim, 12, 48), MixerBlock(16, dim, 20, 32))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# --------------------------------------------------------------------------- HRNet-style


class HRStage(nn.Module):
    """Two branches at two resolutions (a basic block each), then exchange: high + upsampled
    1x1(low), low + strided 3x3(high)."""

    def __init__(self, ch: int, cl: int) -> None:
        super().__init__()
        self.high = nn.Sequential(cbr(ch, ch), cb(ch, ch, 3))
        self.low = nn.Sequential(cbr(cl, cl), cb(cl, cl, 3))
        self.up = cb(cl, ch, 1)
        self.down = cb(ch, cl, 3, 2)

    def forward(self, h: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.high(h) + h)
        low = F.relu(self.low(low) + low)
        up = F.interpolate(self.up(low), scale_factor=2.0, mode="nearest")
        return F.relu(h + up), F.relu(low + self.down(h))


class HRNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 16, 3, 2)
        self.to_low = cbr(16, 32, 3, 2)
        self.stages = nn.ModuleList([HRStage(16, 32), HRStage(16, 32)])
        self.fuse = cbr(16 + 32, 48, 1)
        self.head = ClassifierHead(48, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        low = self.to_low(h)
        for stage in self.stages:
            h, low = stage(h, low)
        low = F.interpolate(low, scale_factor=2.0, mode="nearest")
        return self.head(self.fuse(torch.cat([h, low], dim=1)))


# --------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute to NHWC, normalize, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> NHWC LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale -> NCHW,
    residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + (self.gamma * self.fc2(F.gelu(self.fc1(y)))).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16))
        self.stage1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 24, 2, 2))
        self.stage2 = ConvNeXtBlock(24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


# --------------------------------------------------------------------------- Res2Net


class Res2NetBlock(nn.Module):
    """1x1 -> split into ``scale`` chunks -> hierarchical 3x3 convs (each adds the previous
    output) -> concat -> 1x1, residual."""

    def __init__(self, c: int, width: int, scale: int = 4) -> None:
        super().__init__()
        self.width = width
        self.reduce = cbr(c, width * scale, 1)
        self.convs = nn.ModuleList(cbr(width, width) for _ in range(scale - 1))
        self.expand = cb(width * scale, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(self.reduce(x), self.width, dim=1)
        outs, y = [], parts[0]
        for i, conv in enumerate(self.convs):
            y = conv(parts[i + 1] if i == 0 else parts[i + 1] + y)
            outs.append(y)
        outs.append(parts[0])
        return F.relu(self.expand(torch.cat(outs, dim=1)) + x)


class Res2Net(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 24, 3, 2)
        self.blocks = nn.Sequential(Res2NetBlock(24, 6), Res2NetBlock(24, 4))
        self.head = ClassifierHead(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# --------------------------------------------------------------------------- registry

TORCH_OUTSIDE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnest": (ResNeSt, (3, 16, 16)),
    "ghostnet": (GhostNet, (3, 32, 32)),
    "repvgg": (RepVGG, (3, 32, 32)),
    "cspdarknet": (CSPDarknet, (3, 32, 32)),
    "vit_mha": (ViTMHA, (3, 16, 16)),
    "mlp_mixer": (MLPMixer, (3, 16, 16)),
    "hrnet": (HRNet, (3, 16, 16)),
    "convnext": (ConvNeXt, (3, 32, 32)),
    "res2net": (Res2Net, (3, 16, 16)),
}


def build_torch(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(TORCH_OUTSIDE[name][0](), seed + 1).eval()


def example_torch(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, *TORCH_OUTSIDE[name][1], generator=g)


# --------------------------------------------------------------------------- Keras applications

KERAS_INPUT = (32, 32, 3)


def _keras_apps() -> dict[str, Callable[..., Any]]:
    from keras import applications as apps

    return {
        "keras_mobilenet": functools.partial(apps.MobileNet, alpha=0.25),
        "keras_mobilenet_v3_small": functools.partial(
            apps.MobileNetV3Small, minimalistic=False, include_preprocessing=False
        ),
        "keras_efficientnet_b0": apps.EfficientNetB0,
        "keras_efficientnet_v2_b0": functools.partial(
            apps.EfficientNetV2B0, include_preprocessing=False
        ),
        "keras_resnet50_v2": apps.ResNet50V2,
    }


KERAS_OUTSIDE = ("keras_mobilenet", "keras_mobilenet_v3_small", "keras_efficientnet_b0")
"""Tested (EfficientNetV2B0 and ResNet50V2 also prune and verify, but take minutes to convert)."""


def build_keras(name: str) -> Any:
    """Keras application ``name`` with random weights, 10 classes, a 32x32 input."""
    import keras

    keras.utils.set_random_seed(0)
    return _keras_apps()[name](weights=None, input_shape=KERAS_INPUT, classes=10)


def keras_macs(model: Any) -> int:
    """MACs (batch 1) from each layer's config and its output shape: Conv2D
    ``H*W*k*k*Cin/groups*Cout``, DepthwiseConv2D ``H*W*k*k*Cin*multiplier``, Dense
    ``prod(out[:-1])*in*units``."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * kh * kw * c
        elif isinstance(layer, layers.Conv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += h * w * kh * kw * (cin // layer.groups) * c
        elif isinstance(layer, layers.Dense):
            total += math.prod(layer.output.shape[1:-1]) * layer.input.shape[-1] * layer.units
    return int(total)
