#!/usr/bin/env python
"""Training-step overhead of the MorphNet regularizer (PyTorch and Keras) on ResNet-18 and -50.

Usage::

    python benchmarks/bench_regularizer.py                  # both models, both frameworks
    python benchmarks/bench_regularizer.py --model resnet50 --framework keras --steps 30
    python benchmarks/bench_regularizer.py --kind group_lasso    # group LASSO on the filters

One process; torchvision-style ResNets written in plain torch (torchvision is not needed) and
the same architecture in Keras (its steps compiled with ``tf.function``, as ``model.fit`` runs
them), SGD with momentum, 3x64x64 inputs, batch 8. Steps with ``task_loss`` only and steps with
``task_loss + strength * reg.loss()`` are interleaved (one of each, repeated), so machine drift
hits both equally; the medians are compared. Also timed on its own: ``reg.loss()`` forward +
backward, against the plain step of the same framework measured in the same run.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from morphonnx.regularize import KINDS  # noqa: E402

STRENGTH = 1e-9


Conv = tuple[int, int, int]  # kernel size, output channels, stride


def blocks(bottleneck: bool, depths: tuple[int, ...]) -> Iterator[tuple[int, int, list[Conv], int]]:
    """torchvision's resnet layout after the 7x7 stem and max pool: per block (input channels,
    output channels, its convs, stride). Basic blocks: two 3x3 convs, the first strided;
    bottlenecks: 1x1, 3x3 (strided), 1x1 to 4x the width."""
    cin = 64
    for i, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            cout = 4 * width if bottleneck else width
            if bottleneck:
                convs = [(1, width, 1), (3, width, stride), (1, cout, 1)]
            else:
                convs = [(3, width, stride), (3, width, 1)]
            yield cin, cout, convs, stride
            cin = cout


ARCHS = {
    "resnet18": ("ResNet-18", False, (2, 2, 2, 2)),
    "resnet50": ("ResNet-50", True, (3, 4, 6, 3)),
}


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, convs: list[Conv], stride: int) -> None:
        super().__init__()
        chain, c = [], cin
        for k, width, s in convs:
            chain.append(conv_bn(c, width, k, s))
            c = width
        self.convs = nn.ModuleList(chain)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = torch.relu(conv(x))
        return torch.relu(self.convs[-1](x) + identity)


def torch_resnet(name: str) -> nn.Module:
    """torchvision's ResNet-18 / ResNet-50 in plain torch (torchvision is not needed)."""
    _, bottleneck, depths = ARCHS[name]
    cout = 512 * (4 if bottleneck else 1)
    return nn.Sequential(
        conv_bn(3, 64, 7, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *(Block(*b) for b in blocks(bottleneck, depths)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(cout, 1000),
    )


def keras_resnet(name: str, size: int) -> Any:
    """The same architecture as a functional Keras model (NHWC)."""
    import keras
    from keras import layers

    _, bottleneck, depths = ARCHS[name]

    def conv_bn(x: Any, filters: int, k: int, stride: int = 1) -> Any:
        x = layers.Conv2D(filters, k, stride, padding="same", use_bias=False)(x)
        return layers.BatchNormalization()(x)

    x = inputs = keras.Input((size, size, 3))
    x = layers.MaxPooling2D(3, 2, padding="same")(layers.ReLU()(conv_bn(x, 64, 7, 2)))
    for cin, cout, convs, stride in blocks(bottleneck, depths):
        identity = conv_bn(x, cout, 1, stride) if stride != 1 or cin != cout else x
        for i, (k, width, s) in enumerate(convs):
            x = conv_bn(x, width, k, s)
            x = layers.ReLU()(x) if i < len(convs) - 1 else x
        x = layers.ReLU()(layers.Add()([x, identity]))
    x = layers.Dense(1000)(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, x)


@dataclass
class Run:
    """One framework's model, regularizer and step functions (the timed part only)."""

    title: str
    spec: dict[str, Any]
    reg: Any
    step: Callable[[bool], Any]  # one training step, with or without strength * reg.loss()
    alone: Callable[[], Any]  # reg.loss() forward + backward
    update: Callable[[], Any]  # the optimizer's update alone: a pass over every weight
    t_spec: float
    t_init: float


def _timed(make: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = make()
    return out, time.perf_counter() - t


def torch_run(name: str, args: argparse.Namespace, tmp: Path) -> Run:
    from morphonnx.adapters.torch import Regularizer, export_spec

    torch.manual_seed(0)
    model = torch_resnet(name)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    spec, t_spec = _timed(lambda: export_spec(model, x[:1], tmp / "spec.json"))
    device = "V100" if args.cost == "latency" else None
    reg, t_init = _timed(
        lambda: Regularizer(model, spec, kind=args.kind, cost=args.cost, device=device)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step(with_reg: bool) -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if with_reg:
            loss = loss + STRENGTH * reg.loss()
        loss.backward()
        opt.step()

    def alone() -> None:
        reg.loss().backward()

    return Run("PyTorch", spec, reg, step, alone, opt.step, t_spec, t_init)


def keras_run(name: str, args: argparse.Namespace, tmp: Path) -> Run:
    """The Keras model's steps compiled (``tf.function``), as ``model.fit`` runs them."""
    import keras
    import tensorflow as tf

    from morphonnx.adapters.tf import Regularizer, export_spec

    keras.utils.set_random_seed(0)
    model = keras_resnet(name, args.size)
    x = tf.random.normal((args.batch, args.size, args.size, 3))
    y = tf.random.uniform((args.batch,), 0, 1000, tf.int32)
    signature = (tf.TensorSpec((1, args.size, args.size, 3), tf.float32, name="input"),)
    spec, t_spec = _timed(lambda: export_spec(model, signature, tmp / "spec.json"))
    device = "V100" if args.cost == "latency" else None
    reg, t_init = _timed(
        lambda: Regularizer(model, spec, kind=args.kind, cost=args.cost, device=device)
    )
    opt = keras.optimizers.SGD(1e-3, momentum=0.9)
    opt.build(model.trainable_variables)
    task = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def train(with_reg: bool) -> Any:
        with tf.GradientTape() as tape:
            loss = task(y, model(x, training=True))
            if with_reg:
                loss = loss + STRENGTH * reg.loss()
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    steps = {flag: tf.function(lambda flag=flag: train(flag)) for flag in (False, True)}
    sources = [reg._vars[s.tensor] for s in reg.binding.sources]

    @tf.function
    def alone() -> Any:
        with tf.GradientTape() as tape:
            loss = reg.loss()
        return tape.gradient(loss, sources)

    zeros = [tf.zeros_like(v) for v in model.trainable_variables]

    @tf.function
    def update() -> Any:
        return opt.apply_gradients(zip(zeros, model.trainable_variables, strict=True))

    return Run("Keras", spec, reg, lambda flag: steps[flag](), alone, update, t_spec, t_init)


def bench(name: str, framework: str, args: argparse.Namespace) -> float:
    """Time one model in one framework; returns reg.loss() fwd+bwd over the fastest plain
    step, in percent."""
    with tempfile.TemporaryDirectory() as tmp:
        run = (torch_run if framework == "torch" else keras_run)(name, args, Path(tmp))
    for _ in range(args.warmup):
        run.step(False)
        run.step(True)
        run.alone()
        run.update()
    plain, regd = [], []
    for _ in range(args.steps):
        plain.append(_timed(lambda: run.step(False))[1])
        regd.append(_timed(lambda: run.step(True))[1])
    alone = [_timed(run.alone)[1] for _ in range(args.steps)]
    update = [_timed(run.update)[1] for _ in range(args.steps)]

    p_med, r_med, a_med, u_med = (statistics.median(v) for v in (plain, regd, alone, update))
    channels = sum(run.reg.binding.sizes)
    print(
        f"{ARCHS[name][0]} in {run.title}, input {args.batch}x3x{args.size}x{args.size}, "
        f"{args.threads} threads, kind={args.kind}, cost={args.cost}, "
        f"{len(run.reg.groups)} regularized groups ({channels} channels), "
        f"{len(run.spec['costs'])} cost terms"
    )
    print(f"spec export + analysis     {run.t_spec:8.3f} s (once)")
    print(f"Regularizer.__init__       {run.t_init * 1e3:8.2f} ms (once)")
    print(f"step without regularizer   {p_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"step with reg.loss()       {r_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"reg.loss() fwd+bwd alone   {a_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"optimizer update alone     {u_med * 1e3:8.2f} ms (median of {args.steps})")
    print(f"reg.loss() / update        {a_med / u_med:8.2f}x  (group LASSO reads every filter)")
    print(f"ratio with/without         {r_med / p_med:8.3f}x  (medians; noisy when busy)")
    share = 100 * a_med / min(plain)
    print(f"reg.loss() / plain step    {share:8.2f} %  (target <= 1%)")
    print(flush=True)
    return share


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*ARCHS, "all"], default="all")
    p.add_argument("--framework", choices=["torch", "keras", "all"], default="all")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="measured steps of each kind")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch / TensorFlow threads (default 2)")
    p.add_argument("--cost", default="flops", choices=["flops", "size", "latency"])
    p.add_argument(
        "--kind",
        default="gamma",
        choices=KINDS,
        help="L1 on batch-norm gammas or group LASSO on the filters (default gamma)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    frameworks = ["torch", "keras"] if args.framework == "all" else [args.framework]
    if "keras" in frameworks:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    worst = 0.0
    for name in ARCHS if args.model == "all" else [args.model]:
        for framework in frameworks:
            worst = max(worst, bench(name, framework, args))
    print(f"largest reg.loss() share: {worst:.2f} % (target <= 1%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
