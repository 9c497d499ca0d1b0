#!/usr/bin/env python
"""MorphNet on scikit-learn's digits with Keras: the same experiment as ``digits_morphnet.py``.

Same data split (``load_digits``, stratified 75/25, seed 0) and the same driver
(``digits_common.py``): the same residual CNN with a two-branch concat block in Keras layers
(NHWC), the same schedule; per strength, training from scratch with ``task_loss + strength *
reg.loss()`` (FLOP cost on batch-norm gammas) in a ``tf.GradientTape`` loop; ``reg.write_mask``,
``export_onnx`` of the trained model (same process, same spec), ``python -m morphonnx prune``
(plainly and with ``--fold-constants``); the pruned ONNX model checked with onnxruntime against
the Keras model with its dead channels zeroed; ``reg.slice_model`` checked against it too and
fine-tuned. Prints a table and writes ``results_keras.json`` to ``--out``.

Keras' defaults differ from torch's where it matters here, so the example sets torch's:
batch-norm moving averages that follow the batch statistics at rate 0.1 (Keras ``momentum=0.9``;
its default 0.99 lags the weights that the regularizer moves, and the regularized models then
score far below their training accuracy), epsilon 1e-5, and weight decay added to the gradient
before the momentum (torch's SGD; Keras' ``weight_decay`` is decoupled and ~10x weaker here).

    python examples/digits_keras.py            # a few minutes on 2 CPU cores
    python examples/digits_keras.py --quick    # one strength, short schedules
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import digits_common as common  # noqa: E402  (beside this script)
import keras  # noqa: E402
from keras import layers  # noqa: E402

from morphonnx.adapters.tf import Regularizer, export_onnx, export_spec  # noqa: E402

SIGNATURE = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="input"),)


def digits_net(seed: int) -> Any:
    """stem 16 @8x8 -> residual 16 @8x8 -> residual 32 @4x4 -> concat 16+16 -> pool -> dense.

    Layers are named explicitly: spec tensors are Keras variable paths (``layer/kernel``), and a
    model built again in one process would otherwise get new automatic names (``conv2d_9``)."""
    keras.utils.set_random_seed(seed)
    count = iter(range(100))

    def conv_bn(x: Any, cout: int, k: int, stride: int = 1) -> Any:
        i = next(count)
        y = layers.Conv2D(cout, k, strides=stride, padding="same", use_bias=False, name=f"conv{i}")
        bn = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{i}")
        return bn(y(x))

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


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    return model(x, training=False).numpy()


def trainer(data: common.Split) -> Any:
    def train(
        model: Any, epochs: int, lr: float, seed: int, reg: Regularizer | None, strength: float
    ) -> None:
        """SGD + momentum 0.9 (not Adam: it normalises the L1 step), weight decay 5e-4 in the
        gradient, cosine learning rate, batch 64."""
        steps = epochs * ((len(data.xtr) + 63) // 64)
        opt = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr, steps), momentum=0.9)
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        weights = model.trainable_weights

        @tf.function
        def step(xb: Any, yb: Any) -> None:
            with tf.GradientTape() as tape:
                loss = ce(yb, model(xb, training=True))
                if reg is not None:
                    loss = loss + strength * reg.loss()
            grads = tape.gradient(loss, weights)
            grads = [g + common.WEIGHT_DECAY * w for g, w in zip(grads, weights, strict=True)]
            opt.apply_gradients(zip(grads, weights, strict=True))

        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(len(data.xtr))
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                step(data.xtr[idx], data.ytr[idx])

    return train


def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("MorphNet FLOP regularizer on sklearn digits, Keras", argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.quick:
        epochs, strengths = (12, 4), [2e-6]
    else:
        epochs, strengths = (40, 15), [5e-7, 1e-6, 2e-6]
    data = common.load_split(args.seed, (-1, 8, 8, 1))
    spec_path = args.out / "keras.spec.json"
    export_spec(digits_net(args.seed), SIGNATURE, spec_path)  # weights do not matter
    fw = common.Framework(
        name="keras",
        new_model=digits_net,
        regularizer=lambda m: Regularizer(
            m, spec_path, kind="gamma", cost="flops", threshold=common.THRESHOLD
        ),
        train=trainer(data),
        predict=predict,
        export=lambda m, path: export_onnx(m, SIGNATURE, path),
        stage2=lambda reg, keep: reg.slice_model(keep),
    )
    common.sweep(fw, args, data, strengths, epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
