#!/usr/bin/env python
"""MorphNet on scikit-learn's digits: learn a smaller structure with a FLOP regularizer.

Real data, no download (``sklearn.datasets.load_digits``: 1,797 8x8 grey images, 10 classes).
The model is a small residual CNN with a two-branch concat block. Steps (the driver, data split
and table are shared with ``digits_keras.py`` in ``digits_common.py``):

1. train a baseline with SGD + momentum;
2. for each regularizer strength, train the same architecture from scratch with
   ``task_loss + strength * reg.loss()`` (MorphNet's FLOP cost on batch-norm gammas);
3. write the mask (``reg.write_mask``), export the trained model and prune the export with
   ``python -m morphonnx prune`` (which verifies the pruned graph layer by layer), once plainly and
   once with ``--fold-constants`` (dead channels' batch-norm shifts folded into the next layers);
4. check the plainly pruned ONNX model (onnxruntime) against the torch model with its dead
   channels zeroed (``reg.zero_dead_``), atol 1e-4, and evaluate the folded one;
5. stage 2: fine-tune the physically sliced torch model (``reg.slice_model`` with
   ``fold_constants=True``, so it starts from the trained function) a few epochs and evaluate its
   test accuracy (``slice_model`` without the fold is checked against the pruned ONNX).

Prints a table (strength, FLOPs, % of baseline, test accuracy) and writes ``results_torch.json``,
``accuracy_vs_flops.png`` and ``flops_vs_step.png`` to ``--out`` (default ``examples/out/``).

    python examples/digits_morphnet.py            # about 2-4 minutes on 2 CPU cores
    python examples/digits_morphnet.py --quick    # one strength, short schedules (the test)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import digits_common as common  # noqa: E402  (beside this script)

from morphonnx.adapters.torch import Regularizer, export_onnx, export_spec  # noqa: E402

# --------------------------------------------------------------------------- model


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)
    )


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = conv_bn(cout, cout, 3)
        self.short = None if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.short is None else self.short(x)
        return torch.relu(self.b(torch.relu(self.a(x))) + identity)


class TwoBranch(nn.Module):
    """1x1 branch and 1x1 -> 3x3 branch, concatenated on channels."""

    def __init__(self, cin: int, c1: int, c3: int) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3a = conv_bn(cin, c3, 1)
        self.b3b = conv_bn(c3, c3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = torch.relu(self.b1(x))
        y3 = torch.relu(self.b3b(torch.relu(self.b3a(x))))
        return torch.cat([y1, y3], dim=1)


class DigitsNet(nn.Module):
    """stem 16 @8x8 -> residual 16 @8x8 -> residual 32 @4x4 -> concat 16+16 -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.block1 = Residual(16, 16)
        self.block2 = Residual(16, 32, stride=2)
        self.mix = TwoBranch(32, 16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.mix(x)), 1))


# --------------------------------------------------------------------------- the framework half


def new_model(seed: int) -> DigitsNet:
    torch.manual_seed(seed)
    return DigitsNet()


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def trainer(data: common.Split, traces: dict[float, list[float]]) -> Callable[..., None]:
    """The training loop; with a regularizer, the cost of every step goes to ``traces``."""
    xtr, ytr = torch.from_numpy(data.xtr), torch.from_numpy(data.ytr)

    def train(
        model: nn.Module,
        epochs: int,
        lr: float,
        seed: int,
        reg: Regularizer | None,
        strength: float,
    ) -> None:
        """SGD + momentum (not Adam: Adam normalises the L1 step, so no gamma reaches zero),
        weight decay 5e-4, cosine learning rate, batch 64."""
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=common.WEIGHT_DECAY
        )
        steps = epochs * ((len(xtr) + 63) // 64)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        g = torch.Generator().manual_seed(seed)
        trace = traces.setdefault(strength, []) if reg is not None else None
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(xtr), generator=g).split(64):
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                if reg is not None:
                    loss = loss + strength * reg.loss()
                    trace.append(float(reg.last_cost))  # type: ignore[union-attr]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

    return train


# --------------------------------------------------------------------------- the experiment


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("MorphNet FLOP regularizer on sklearn digits", argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        epochs, strengths = (12, 4), [2e-6]
    else:
        epochs, strengths = (40, 15), [5e-7, 1e-6, 2e-6]
    data = common.load_split(args.seed, (-1, 1, 8, 8))
    example = torch.from_numpy(data.xtr[:1])

    # spec: the structure of any export of DigitsNet (names = state_dict keys)
    spec_path = args.out / "torch.spec.json"
    export_spec(new_model(args.seed), example, spec_path, dynamic_batch=True)
    traces: dict[float, list[float]] = {}
    fw = common.Framework(
        name="torch",
        new_model=new_model,
        regularizer=lambda m: Regularizer(
            m, spec_path, kind="gamma", cost="flops", threshold=common.THRESHOLD
        ),
        train=trainer(data, traces),
        predict=predict,
        export=lambda m, path: export_onnx(m, example, path, dynamic_batch=True),
        # stage 2 starts from the trained function: dead channels' constants folded into biases
        stage2=lambda reg, keep: reg.slice_model(keep, fold_constants=True),
    )
    summary = common.sweep(fw, args, data, strengths, epochs)
    base = summary["baseline"]
    plot(args.out, base["flops"], base["accuracy"], summary["runs"], traces)
    print(f"wrote {args.out / 'results_torch.json'} and plots")
    return 0


def plot(
    out: Path,
    base_flops: int,
    base_acc: float,
    rows: list[dict[str, float]],
    traces: dict[float, list[float]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([base_flops], [base_acc], marker="*", s=150, label="baseline", color="k")
    for r in rows:
        ax.scatter([r["flops"]], [r["acc_finetuned"]], label=f"{r['strength']:.0e} fine-tuned")
        ax.scatter([r["flops"]], [r["acc_pruned"]], marker="x", color="grey")
        ax.scatter([r["flops"]], [r["acc_pruned_folded"]], marker="+", s=80, color="k")
    ax.set_xlabel("FLOPs (Conv/Gemm, batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits: accuracy vs FLOPs\n(before fine-tuning: + pruned with fold, x without)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for strength, trace in traces.items():
        ax.plot(np.arange(len(trace)), trace, label=f"strength {strength:.0e}")
    ax.axhline(base_flops, color="k", linestyle=":", label="baseline")
    ax.set_xlabel("training step")
    ax.set_ylabel("FLOP cost of alive structure")
    ax.set_title("MorphNet FLOP cost during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "flops_vs_step.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
