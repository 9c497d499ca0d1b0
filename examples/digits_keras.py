#!/usr/bin/env python
"""MorphNet on scikit-learn's digits with Keras: the same experiment as ``digits_morphnet.py``.

Same data split (``load_digits``, stratified 75/25, seed 0), the same residual CNN with a
two-branch concat block in Keras layers (NHWC), the same schedule: baseline; for each strength,
training from scratch with ``task_loss + strength * reg.loss()`` (FLOP cost on batch-norm gammas)
in a ``tf.GradientTape`` loop; ``reg.write_mask``, ``export_onnx`` of the trained model (same
process, same spec), ``python -m morphonnx prune``; the pruned ONNX model checked with
onnxruntime against the Keras model with its dead channels zeroed; ``reg.slice_model`` checked
against it too and fine-tuned. Prints a table and writes ``results_keras.json`` to ``--out``.

    python examples/digits_keras.py            # a few minutes on 2 CPU cores
    python examples/digits_keras.py --quick    # one strength, short schedules
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import keras  # noqa: E402
from keras import layers  # noqa: E402

from morphonnx.adapters.tf import Regularizer, export_onnx, export_spec  # noqa: E402

SIGNATURE = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="input"),)


def digits_net() -> Any:
    """stem 16 @8x8 -> residual 16 @8x8 -> residual 32 @4x4 -> concat 16+16 -> pool -> dense.

    Layers are named explicitly: spec tensors are Keras variable paths (``layer/kernel``), and a
    model built again in one process would otherwise get new automatic names (``conv2d_9``)."""
    count = iter(range(100))

    def conv_bn(x: Any, cout: int, k: int, stride: int = 1) -> Any:
        i = next(count)
        y = layers.Conv2D(cout, k, strides=stride, padding="same", use_bias=False, name=f"conv{i}")
        return layers.BatchNormalization(name=f"bn{i}")(y(x))

    def residual(x: Any, cout: int, stride: int = 1) -> Any:
        short = x if stride == 1 and x.shape[-1] == cout else conv_bn(x, cout, 1, stride)
        y = conv_bn(layers.ReLU()(conv_bn(x, cout, 3, stride)), cout, 3)
        return layers.ReLU()(layers.Add()([y, short]))

    x = keras.Input((8, 8, 1))
    y = residual(residual(layers.ReLU()(conv_bn(x, 16, 3)), 16), 32, stride=2)
    b1 = layers.ReLU()(conv_bn(y, 16, 1))
    b3 = layers.ReLU()(conv_bn(layers.ReLU()(conv_bn(y, 16, 1)), 16, 3))
    y = layers.GlobalAveragePooling2D()(layers.Concatenate()([b1, b3]))
    return keras.Model(x, layers.Dense(10, name="fc")(y))


def load_data(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((model(x, training=False).numpy().argmax(1) == y).mean()) * 100


def train(
    model: Any,
    data: tuple[np.ndarray, ...],
    epochs: int,
    lr: float,
    seed: int,
    reg: Regularizer | None = None,
    strength: float = 0.0,
) -> None:
    """SGD + momentum 0.9 (not Adam: it normalises the L1 step), weight decay 5e-4, cosine
    learning rate, batch 64; with ``reg``, ``strength * reg.loss()`` is added."""
    xtr, ytr = data[0], data[1]
    steps = epochs * ((len(xtr) + 63) // 64)
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)
    opt = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=5e-4)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(xb: Any, yb: Any) -> None:
        with tf.GradientTape() as tape:
            loss = ce(yb, model(xb, training=True))
            if reg is not None:
                loss = loss + strength * reg.loss()
        grads = tape.gradient(loss, model.trainable_weights)
        opt.apply_gradients(zip(grads, model.trainable_weights, strict=True))

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = order[i : i + 64]
            step(xtr[idx], ytr[idx])


def conv_gemm_flops(path: Path) -> int:
    from morphonnx.analysis import analyze

    return int(sum(c.flops for c in analyze(path).costs if c.op_type in ("Conv", "Gemm", "MatMul")))


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def prune_cli(model_path: Path, mask_path: Path, out: Path) -> None:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [sys.executable, "-m", "morphonnx", "prune", str(model_path), "--mask", str(mask_path)]
    r = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"morphonnx prune failed: {r.stderr.strip()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MorphNet FLOP regularizer on sklearn digits, Keras")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one strength, short schedules")
    p.add_argument("--strengths", type=float, nargs="+", default=None)
    args = p.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args.out.mkdir(parents=True, exist_ok=True)
    epochs, ft_epochs, strengths = (12, 4, [2e-6]) if args.quick else (40, 15, [5e-7, 1e-6])
    strengths = args.strengths or strengths
    started = time.perf_counter()
    data = load_data(args.seed)
    xte, yte = data[2], data[3]

    keras.utils.set_random_seed(args.seed)
    base = digits_net()
    spec_path = args.out / "keras.spec.json"
    export_spec(base, SIGNATURE, spec_path)  # weights do not matter
    train(base, data, epochs, 0.05, args.seed)
    base_acc = accuracy(base, xte, yte)
    export_onnx(base, SIGNATURE, args.out / "keras.baseline.onnx")
    base_flops = conv_gemm_flops(args.out / "keras.baseline.onnx")
    print(f"baseline: {base_flops:,} FLOPs, test accuracy {base_acc:.2f}%")

    rows: list[dict[str, Any]] = []
    for strength in strengths:
        tag = f"keras.s{strength:.0e}"
        keras.utils.set_random_seed(args.seed)
        model = digits_net()
        reg = Regularizer(model, spec_path, kind="gamma", cost="flops", threshold=1e-2)
        train(model, data, epochs, 0.05, args.seed, reg, strength)
        reg_acc = accuracy(model, xte, yte)
        trained, pruned = args.out / f"{tag}.onnx", args.out / f"{tag}.pruned.onnx"
        mask_path = args.out / f"{tag}.mask.json"
        export_onnx(model, SIGNATURE, trained)  # same process as the spec's export
        result = reg.write_mask(mask_path)
        prune_cli(trained, mask_path, pruned)
        flops = conv_gemm_flops(pruned)

        reg.zero_dead_(result)
        zeroed_acc = accuracy(model, xte, yte)
        want = model(xte, training=False).numpy()
        diff_zeroed = float(np.abs(run_ort(pruned, xte) - want).max())
        if diff_zeroed > 1e-4:
            raise SystemExit(f"{pruned}: differs from the zeroed Keras model by {diff_zeroed:.2e}")
        small = reg.slice_model(result)
        diff_sliced = float(np.abs(small(xte, training=False).numpy() - want).max())
        if diff_sliced > 1e-4:
            raise SystemExit(f"sliced model differs from the zeroed model by {diff_sliced:.2e}")
        train(small, data, ft_epochs, 0.01, args.seed + 1)
        ft_acc = accuracy(small, xte, yte)
        rows.append(
            {
                "strength": strength,
                "flops": flops,
                "predicted_flops": reg.cost(),
                "percent_of_baseline": 100.0 * flops / base_flops,
                "acc_regularized": reg_acc,
                "acc_pruned": zeroed_acc,
                "acc_finetuned": ft_acc,
                "max_abs_diff_onnx_vs_zeroed": diff_zeroed,
                "max_abs_diff_sliced_vs_zeroed": diff_sliced,
                "alive_channels": {g: int(sum(k)) for g, k in result.keep.items()},
            }
        )
        print(
            f"strength {strength:.0e}: {flops:,} FLOPs ({100.0 * flops / base_flops:.1f}%), "
            f"accuracy regularized {reg_acc:.2f}% -> pruned {zeroed_acc:.2f}% -> "
            f"fine-tuned {ft_acc:.2f}%; ONNX vs Keras {diff_zeroed:.1e}"
        )

    elapsed = time.perf_counter() - started
    print(f"\n{'strength':>9} {'FLOPs':>10} {'% base':>7} {'acc %':>7} {'Δacc':>6}")
    print(f"{'baseline':>9} {base_flops:>10,} {100.0:>7.1f} {base_acc:>7.2f} {0.0:>6.2f}")
    for r in rows:
        print(
            f"{r['strength']:>9.0e} {int(r['flops']):>10,} {r['percent_of_baseline']:>7.1f} "
            f"{r['acc_finetuned']:>7.2f} {r['acc_finetuned'] - base_acc:>+6.2f}"
        )
    print(f"({elapsed:.0f} s; accuracy after fine-tuning the sliced model, {len(xte)} test images)")
    summary = {
        "baseline": {"flops": base_flops, "accuracy": base_acc},
        "runs": rows,
        "seconds": elapsed,
        "quick": args.quick,
        "seed": args.seed,
    }
    (args.out / "results_keras.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
