#!/usr/bin/env python
"""MorphNet on scikit-learn's digits: learn a smaller structure with a FLOP regularizer.

Real data, no download (``sklearn.datasets.load_digits``: 1,797 8x8 grey images, 10 classes).
The model is a small residual CNN with a two-branch concat block. Steps:

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

Prints a table (strength, FLOPs, % of baseline, test accuracy) and writes ``results.json``,
``accuracy_vs_flops.png`` and ``flops_vs_step.png`` to ``--out`` (default ``examples/out/``).

    python examples/digits_morphnet.py            # about 2-4 minutes on 2 CPU cores
    python examples/digits_morphnet.py --quick    # one strength, short schedules (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


# --------------------------------------------------------------------------- data / training


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return (
        torch.from_numpy(xtr),
        torch.from_numpy(ytr).long(),
        torch.from_numpy(xte),
        torch.from_numpy(yte).long(),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, ...],
    epochs: int,
    lr: float,
    seed: int,
    reg: Regularizer | None = None,
    strength: float = 0.0,
    trace: list[float] | None = None,
) -> None:
    """SGD + momentum (not Adam: Adam normalises the L1 step, so no gamma reaches zero), cosine
    learning rate, batch 64. With ``reg``, adds ``strength * reg.loss()`` and logs the cost."""
    xtr, ytr = data[0], data[1]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if reg is not None:
                loss = loss + strength * reg.loss()
                if trace is not None:
                    trace.append(float(reg.last_cost))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def conv_gemm_flops(path: Path) -> int:
    """FLOPs of Conv/Gemm/MatMul ops as ``morphonnx analyze`` counts them (batch 1)."""
    from morphonnx.analysis import analyze

    return int(sum(c.flops for c in analyze(path).costs if c.op_type in ("Conv", "Gemm", "MatMul")))


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def prune_cli(model_path: Path, mask_path: Path, out: Path, *extra: str) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "morphonnx", "prune", str(model_path), "--mask", str(mask_path)]
    r = subprocess.run([*cmd, "-o", str(out), *extra], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"morphonnx prune failed: {r.stderr.strip()}")


# --------------------------------------------------------------------------- the experiment


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MorphNet FLOP regularizer on sklearn digits")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one strength, short schedules")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strengths", type=float, nargs="+", default=None, help="regularizer strengths")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        epochs, ft_epochs, strengths = 12, 4, [2e-6]
    else:
        epochs, ft_epochs, strengths = 40, 15, [5e-7, 1e-6, 2e-6]
    strengths = args.strengths or strengths
    threshold = 1e-2
    started = time.perf_counter()

    data = load_data(args.seed)
    xte, yte = data[2], data[3]
    example = data[0][:1]

    # spec: the structure of any export of DigitsNet (names = state_dict keys)
    torch.manual_seed(args.seed)
    spec_path = args.out / "spec.json"
    export_spec(DigitsNet(), example, spec_path, dynamic_batch=True)

    torch.manual_seed(args.seed)
    base = DigitsNet()
    train(base, data, epochs, 0.05, args.seed)
    base_acc = accuracy(base, xte, yte)
    export_onnx(base, example, args.out / "baseline.onnx", dynamic_batch=True)
    base_flops = conv_gemm_flops(args.out / "baseline.onnx")
    print(f"baseline: {base_flops:,} FLOPs, test accuracy {base_acc:.2f}%")

    rows: list[dict[str, float]] = []
    traces: dict[float, list[float]] = {}
    for strength in strengths:
        tag = f"s{strength:.0e}"
        torch.manual_seed(args.seed)
        model = DigitsNet()
        reg = Regularizer(model, spec_path, kind="gamma", cost="flops", threshold=threshold)
        traces[strength] = []
        train(model, data, epochs, 0.05, args.seed, reg, strength, traces[strength])
        reg_acc = accuracy(model, xte, yte)

        trained = args.out / f"{tag}.onnx"
        pruned = args.out / f"{tag}.pruned.onnx"
        folded = args.out / f"{tag}.folded.onnx"
        mask_path = args.out / f"{tag}.mask.json"
        export_onnx(model, example, trained, dynamic_batch=True)
        result = reg.write_mask(mask_path)
        prune_cli(trained, mask_path, pruned)
        prune_cli(trained, mask_path, folded, "--fold-constants")
        flops = conv_gemm_flops(pruned)
        predicted = reg.cost()
        folded_acc = float((run_ort(folded, xte).argmax(1) == yte.numpy()).mean()) * 100
        # stage 2 starts from the trained function: dead channels' constants folded into biases
        small = reg.slice_model(result, fold_constants=True)
        sliced_acc = accuracy(small, xte, yte)

        # the pruned ONNX model == the torch model with its dead channels zeroed
        reg.zero_dead_(result)
        zeroed_acc = accuracy(model, xte, yte)
        with torch.no_grad():
            want = model.eval()(xte).numpy()
        diff_zeroed = float(np.abs(run_ort(pruned, xte) - want).max())
        if diff_zeroed > 1e-4:
            raise SystemExit(f"{pruned}: differs from the zeroed torch model by {diff_zeroed:.2e}")

        with torch.no_grad():
            diff_sliced = float(np.abs(reg.slice_model(result).eval()(xte).numpy() - want).max())
        if diff_sliced > 1e-4:
            raise SystemExit(f"sliced model differs from the zeroed model by {diff_sliced:.2e}")

        # stage 2: fine-tune the physically smaller model
        train(small, data, ft_epochs, 0.01, args.seed + 1)
        ft_acc = accuracy(small, xte, yte)
        export_onnx(small, example, args.out / f"{tag}.finetuned.onnx", dynamic_batch=True)
        alive = {g: int(sum(k)) for g, k in result.keep.items()}
        rows.append(
            {
                "strength": strength,
                "flops": flops,
                "predicted_flops": predicted,
                "percent_of_baseline": 100.0 * flops / base_flops,
                "acc_regularized": reg_acc,
                "acc_pruned": zeroed_acc,
                "acc_pruned_folded": folded_acc,
                "acc_sliced_folded": sliced_acc,
                "acc_finetuned": ft_acc,
                "max_abs_diff_onnx_vs_zeroed": diff_zeroed,
                "max_abs_diff_sliced_vs_zeroed": diff_sliced,
                "alive_channels": alive,  # type: ignore[dict-item]
            }
        )
        print(
            f"strength {strength:.0e}: {flops:,} FLOPs ({100.0 * flops / base_flops:.1f}%), "
            f"accuracy regularized {reg_acc:.2f}% -> pruned {zeroed_acc:.2f}%, with the fold "
            f"{folded_acc:.2f}% (torch slice {sliced_acc:.2f}%) -> fine-tuned {ft_acc:.2f}%; "
            f"ONNX vs torch {diff_zeroed:.1e}"
        )

    elapsed = time.perf_counter() - started
    print()
    print(f"{'strength':>9} {'FLOPs':>10} {'% base':>7} {'reg %':>7} {'fold %':>7} {'acc %':>7}")
    print(f"{'baseline':>9} {base_flops:>10,} {100.0:>7.1f} {'':>7} {'':>7} {base_acc:>7.2f}")
    for r in rows:
        print(
            f"{r['strength']:>9.0e} {int(r['flops']):>10,} {r['percent_of_baseline']:>7.1f} "
            f"{r['acc_regularized']:>7.2f} {r['acc_pruned_folded']:>7.2f} "
            f"{r['acc_finetuned']:>7.2f}"
        )
    print(
        f"({elapsed:.0f} s; test accuracy of the regularized model, pruned with the fold, and "
        f"after fine-tuning, {len(xte)} test images)"
    )

    summary = {
        "baseline": {"flops": base_flops, "accuracy": base_acc},
        "runs": rows,
        "seconds": elapsed,
        "quick": args.quick,
        "seed": args.seed,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(args.out, base_flops, base_acc, rows, traces)
    print(f"wrote {args.out / 'results.json'} and plots")
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
