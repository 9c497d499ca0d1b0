#!/usr/bin/env python
"""Training-step overhead of the torch MorphNet regularizer on ResNet-18 and ResNet-50.

Usage::

    python benchmarks/bench_regularizer.py                  # both models, 3x64x64, batch 8
    python benchmarks/bench_regularizer.py --model resnet50 --size 112 --steps 30 --threads 2

One process; torchvision-style ResNets written in plain torch (torchvision is not needed), SGD
with momentum. Steps with ``task_loss`` only and steps with ``task_loss + strength * reg.loss()``
are interleaved (one of each, repeated), so machine drift hits both equally; the medians are
compared. Also timed on its own: ``reg.loss()`` forward + backward, against the plain step.

Target: ``reg.loss()`` forward + backward at most 1% of the plain training step (all groups are
evaluated at once: a few gathers, one segment count, one dot product). On a busy machine the step
ratio is noisy; the regularizer's own time over the fastest plain step is the steadier number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morphonnx.adapters.torch import Regularizer, export_spec  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's resnet layout: 7x7 stem, max pool, four stages of blocks, fc. ResNet-18:
    basic blocks [2, 2, 2, 2]; ResNet-50: bottlenecks [3, 4, 6, 3]."""

    def __init__(self, bottleneck: bool, depths: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                if bottleneck:
                    blocks.append(Bottleneck(cin, width, stride))
                    cin = 4 * width
                else:
                    blocks.append(BasicBlock(cin, width, stride))
                    cin = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


MODELS = {
    "resnet18": ("ResNet-18", lambda: ResNet(False, (2, 2, 2, 2))),
    "resnet50": ("ResNet-50", lambda: ResNet(True, (3, 4, 6, 3))),
}


def bench(name: str, args: argparse.Namespace) -> float:
    """Time one model; returns reg.loss() fwd+bwd over the fastest plain step."""
    title, make = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        spec = export_spec(model, x[:1], Path(tmp) / "spec.json")
        t_spec = time.perf_counter() - t0
    t0 = time.perf_counter()
    device = "V100" if args.cost == "latency" else None
    reg = Regularizer(model, spec, cost=args.cost, device=device)
    t_init = time.perf_counter() - t0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    strength = 1e-9

    def step(with_reg: bool) -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if with_reg:
            loss = loss + strength * reg.loss()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        step(False)
        step(True)
    plain, regd = [], []
    for _ in range(args.steps):
        plain.append(step(False))
        regd.append(step(True))
    alone = []
    for _ in range(args.steps):
        t = time.perf_counter()
        reg.loss().backward()
        alone.append(time.perf_counter() - t)
    opt.zero_grad(set_to_none=True)

    p_med, r_med, a_med = (statistics.median(v) for v in (plain, regd, alone))
    channels = sum(reg.binding.sizes)
    print(
        f"{title}, input {args.batch}x3x{args.size}x{args.size}, {args.threads} threads, "
        f"cost={args.cost}, {len(reg.groups)} regularized groups ({channels} channels), "
        f"{len(spec['costs'])} cost terms"
    )
    print(f"spec export + analysis     {t_spec:8.3f} s (once)")
    print(f"Regularizer.__init__       {t_init * 1e3:8.2f} ms (once)")
    print(f"step without regularizer   {p_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"step with reg.loss()       {r_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"reg.loss() fwd+bwd alone   {a_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"ratio with/without         {r_med / p_med:8.3f}x  (medians; noisy when busy)")
    share = 100 * a_med / min(plain)
    print(f"reg.loss() / plain step    {share:8.2f} %  (target <= 1%)")
    print()
    return share


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="all")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="measured steps of each kind")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--cost", default="flops", choices=["flops", "size", "latency"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in MODELS if args.model == "all" else [args.model]:
        bench(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
