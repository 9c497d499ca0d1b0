"""The framework-neutral half of the digits examples (``digits_morphnet.py``, ``digits_keras.py``).

Both examples run one experiment: the same data split, a baseline, then per regularizer strength
a model trained from scratch with MorphNet's FLOP regularizer, masked, exported, pruned with
``python -m morphonnx prune`` (plainly and with ``--fold-constants``), checked with onnxruntime
against the framework model with its dead channels zeroed, sliced and fine-tuned. This module
holds that driver (``sweep``), the data, the FLOP count and the table; each example supplies a
``Framework``: its model, training loop, inference and export, nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 1e-2  # gammas below this are dead (the Regularizer's threshold)
LR, FT_LR = 0.05, 0.01  # training from scratch / fine-tuning the sliced model
WEIGHT_DECAY = 5e-4  # added to the gradient before the momentum (torch's SGD)


@dataclass
class Split:
    """scikit-learn's digits, stratified 75/25, standardised with the training set's statistics."""

    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray


@dataclass
class Framework:
    """What an example supplies: everything that needs torch or Keras.

    ``new_model(seed)`` builds the architecture with seeded initial weights; ``train(model,
    epochs, lr, seed, reg, strength)`` trains in place (``reg`` None: no regularizer, else
    ``strength * reg.loss()`` is added to the task loss); ``predict(model, x)`` returns
    inference-mode logits as numpy; ``export`` writes ONNX; ``stage2(reg, keep)`` is the sliced
    model that fine-tuning starts from."""

    name: str
    new_model: Callable[[int], Any]
    regularizer: Callable[[Any], Any]
    train: Callable[[Any, int, float, int, Any, float], None]
    predict: Callable[[Any, np.ndarray], np.ndarray]
    export: Callable[[Any, Path], None]
    stage2: Callable[[Any, Any], Any]


def parse_args(description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one strength, short schedules")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--strengths", type=float, nargs="+", default=None, help="regularizer strengths")
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def load_split(seed: int, shape: tuple[int, ...]) -> Split:
    """The split both examples use; ``shape`` is the per-batch image shape (NCHW or NHWC)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(shape)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    return Split((xtr - mean) / std, ytr.astype(np.int64), (xte - mean) / std, yte.astype(np.int64))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) * 100


def conv_gemm_flops(path: Path) -> int:
    """FLOPs of Conv/Gemm/MatMul ops as ``morphonnx analyze`` counts them (batch 1)."""
    from morphonnx.analysis import analyze

    return int(sum(c.flops for c in analyze(path).costs if c.op_type in ("Conv", "Gemm", "MatMul")))


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def prune_cli(model_path: Path, mask_path: Path, out: Path, *extra: str) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "morphonnx", "prune", str(model_path), "--mask", str(mask_path)]
    r = subprocess.run([*cmd, "-o", str(out), *extra], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"morphonnx prune failed: {r.stderr.strip()}")


def max_diff(what: str, got: np.ndarray, want: np.ndarray, atol: float = 1e-4) -> float:
    """Largest absolute difference; the experiment stops if it exceeds ``atol``."""
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise SystemExit(f"{what}: differs from the zeroed model by {diff:.2e}")
    return diff


def run_strength(
    fw: Framework, data: Split, out: Path, seed: int, strength: float, epochs: tuple[int, int]
) -> dict[str, Any]:
    """One row: train with the regularizer, mask, prune (plain, folded), check, slice, fine-tune."""
    tag = f"{fw.name}.s{strength:.0e}"
    model = fw.new_model(seed)
    reg = fw.regularizer(model)
    fw.train(model, epochs[0], LR, seed, reg, strength)
    reg_acc = accuracy(fw.predict(model, data.xte), data.yte)

    trained, mask = out / f"{tag}.onnx", out / f"{tag}.mask.json"
    pruned, folded = out / f"{tag}.pruned.onnx", out / f"{tag}.folded.onnx"
    fw.export(model, trained)  # same process as the spec's export
    result = reg.write_mask(mask)
    prune_cli(trained, mask, pruned)
    prune_cli(trained, mask, folded, "--fold-constants")
    folded_acc = accuracy(run_ort(folded, data.xte), data.yte)
    predicted = reg.cost()
    small = fw.stage2(reg, result)
    sliced_acc = accuracy(fw.predict(small, data.xte), data.yte)

    # the pruned ONNX model and the plainly sliced model == the model with dead channels zeroed
    reg.zero_dead_(result)
    want = fw.predict(model, data.xte)
    diff_zeroed = max_diff(str(pruned), run_ort(pruned, data.xte), want)
    diff_sliced = max_diff("sliced model", fw.predict(reg.slice_model(result), data.xte), want)

    fw.train(small, epochs[1], FT_LR, seed + 1, None, 0.0)  # stage 2: the physically smaller model
    fw.export(small, out / f"{tag}.finetuned.onnx")
    return {
        "strength": strength,
        "flops": conv_gemm_flops(pruned),
        "predicted_flops": predicted,
        "acc_regularized": reg_acc,
        "acc_pruned": accuracy(want, data.yte),
        "acc_pruned_folded": folded_acc,
        "acc_sliced_stage2": sliced_acc,
        "acc_finetuned": accuracy(fw.predict(small, data.xte), data.yte),
        "max_abs_diff_onnx_vs_zeroed": diff_zeroed,
        "max_abs_diff_sliced_vs_zeroed": diff_sliced,
        "alive_channels": {g: int(sum(k)) for g, k in result.keep.items()},
    }


def sweep(
    fw: Framework,
    args: argparse.Namespace,
    data: Split,
    strengths: list[float],
    epochs: tuple[int, int],
) -> dict[str, Any]:
    """Baseline, then one ``run_strength`` row per strength; prints the table, writes
    ``results_<fw.name>.json`` and returns the summary. Every model starts from ``args.seed``'s
    initial weights and batch order; fine-tuning shuffles with ``args.seed + 1``."""
    started = time.perf_counter()
    base = fw.new_model(args.seed)
    fw.train(base, epochs[0], LR, args.seed, None, 0.0)
    base_acc = accuracy(fw.predict(base, data.xte), data.yte)
    fw.export(base, args.out / f"{fw.name}.baseline.onnx")
    base_flops = conv_gemm_flops(args.out / f"{fw.name}.baseline.onnx")
    print(f"baseline: {base_flops:,} FLOPs, test accuracy {base_acc:.2f}%")
    rows = []
    for strength in args.strengths or strengths:
        r = run_strength(fw, data, args.out, args.seed, strength, epochs)
        r["percent_of_baseline"] = 100.0 * r["flops"] / base_flops
        rows.append(r)
        print(
            f"strength {strength:.0e}: {r['flops']:,} FLOPs ({r['percent_of_baseline']:.1f}%), "
            f"accuracy regularized {r['acc_regularized']:.2f}% -> pruned {r['acc_pruned']:.2f}%, "
            f"with the fold {r['acc_pruned_folded']:.2f}% (stage 2 starts at "
            f"{r['acc_sliced_stage2']:.2f}%) -> fine-tuned {r['acc_finetuned']:.2f}%; "
            f"ONNX vs {fw.name} {r['max_abs_diff_onnx_vs_zeroed']:.1e}"
        )
    elapsed = time.perf_counter() - started
    print_table(base_flops, base_acc, rows)
    print(
        f"(seed {args.seed}, {elapsed:.0f} s; test accuracy of the regularized model, pruned "
        f"with the fold, and after fine-tuning the sliced model, {len(data.yte)} test images)"
    )
    summary = {
        "baseline": {"flops": base_flops, "accuracy": base_acc},
        "runs": rows,
        "seconds": elapsed,
        "quick": args.quick,
        "seed": args.seed,
    }
    (args.out / f"results_{fw.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_table(base_flops: int, base_acc: float, rows: list[dict[str, Any]]) -> None:
    print()
    head = ("strength", "FLOPs", "% base", "reg %", "fold %", "acc %", "Δacc")
    print(f"{head[0]:>9} {head[1]:>10} " + " ".join(f"{h:>7}" for h in head[2:]))
    print(f"{'baseline':>9} {base_flops:>10,} {100.0:>7.1f} {'':>7} {'':>7} {base_acc:>7.2f}")
    for r in rows:
        print(
            f"{r['strength']:>9.0e} {r['flops']:>10,} {r['percent_of_baseline']:>7.1f} "
            f"{r['acc_regularized']:>7.2f} {r['acc_pruned_folded']:>7.2f} "
            f"{r['acc_finetuned']:>7.2f} {r['acc_finetuned'] - base_acc:>+7.2f}"
        )
