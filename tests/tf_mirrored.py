"""Run by test_adapter_tf.py in a fresh process: TensorFlow fixes its logical devices at first
use. Two logical CPUs, a MirroredStrategy, the Keras regularizer inside ``strategy.run``; writes
what the test checks to the JSON file named by argv[1]."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
from keras import layers  # noqa: E402

from morphonnx.adapters.tf import Regularizer, export_spec  # noqa: E402


def main(out: Path) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        x = keras.Input((6, 6, 3))
        y = layers.Conv2D(4, 3, padding="same", use_bias=False)(x)
        y = layers.ReLU()(layers.BatchNormalization(name="bn1")(y))
        y = layers.Conv2D(5, 3, padding="same", use_bias=False)(y)
        y = layers.ReLU()(layers.BatchNormalization(name="bn2")(y))
        model = keras.Model(x, layers.Dense(2)(layers.GlobalAveragePooling2D()(y)))
        model.get_layer("bn1").gamma.assign([1.0, -0.5, 0.001, 0.2])
        model.get_layer("bn2").gamma.assign([0.3, 0.0, -2.0, 0.005, 0.1])
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_weights)
    with tempfile.TemporaryDirectory() as tmp:
        spec = export_spec(model, (tf.TensorSpec((None, 6, 6, 3), tf.float32),), Path(tmp) / "s")
    reg = Regularizer(model, spec, threshold=1e-2)
    gammas = [model.get_layer(n).gamma for n in ("bn1", "bn2")]
    with tf.GradientTape() as tape:
        eager = reg.loss()
    grads = [g.numpy() for g in tape.gradient(eager, gammas)]
    start = [g.numpy() for g in gammas]
    strength = 1e-4

    @tf.function
    def step() -> tf.Tensor:
        def replica() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = reg.loss()
                scaled = strength * loss / strategy.num_replicas_in_sync
            g = tape.gradient(scaled, model.trainable_weights)
            opt.apply_gradients(
                [(d, v) for d, v in zip(g, model.trainable_weights, strict=True) if d is not None]
            )
            return loss

        return strategy.run(replica)

    losses = strategy.experimental_local_results(step())
    moved = np.concatenate([g.numpy() - s for g, s in zip(gammas, start, strict=True)])
    expected = np.concatenate([-0.1 * strength * d for d in grads])
    out.write_text(
        json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "eager_loss": float(eager),
                "replica_losses": [float(v) for v in losses],
                "moved": moved.tolist(),
                "expected": expected.tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
