"""Keras 3 (TensorFlow) side of MorphNet: an ONNX export whose structure and names do not depend
on weight values or on per-process counters, the regularizer's tensor ops, and stage 2.

tf2onnx folds batch norms into convolutions, drops zero biases, merges equal constants and names
tensors with process-wide counters, so its output depends on the weights' values and on how many
exports ran before. :func:`export_onnx` therefore exports twice with generic random values in
every variable (no zeros, no equal tensors), keeps BatchNormalization as its own node (its gamma
is MorphNet's signal, and the spec must see it), identifies every ONNX constant as one Keras
variable in ONNX layout (a constant that is a mix of weights is refused: its values could not be
written exactly), names it by the variable's path and strips the counters from every other name.
Everything framework-neutral is in :mod:`morphonnx.binding`. tensorflow is imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from morphonnx.adapterbase import RegularizerBase
from morphonnx.binding import Param

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

__all__ = ["Regularizer", "export_onnx", "export_spec", "keras_layouts", "tf_ops"]

_EXPORT_LOCK = threading.Lock()


def keras_layouts(model: Any) -> dict[str, tuple[Any, tuple[int, ...]]]:
    """Variable path -> (variable, axis map): ONNX axis ``a`` of the exported constant is axis
    ``perm[a]`` of the Keras variable. Conv kernels ``(*k, in, out)`` export as
    ``(out, in, *k)``, transposed-conv kernels ``(*k, out, in)`` as ``(in, out, *k)``, depthwise
    kernels ``(*k, C, 1)`` as ``(C, 1, *k)``; everything else (Dense ``in x out``, biases, batch
    norms) keeps its layout."""
    from keras import layers

    conv: tuple[Any, ...] = (layers.Conv1D, layers.Conv2D, layers.Conv3D)
    conv += (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    depthwise = (layers.DepthwiseConv1D, layers.DepthwiseConv2D)
    separable = (layers.SeparableConv1D, layers.SeparableConv2D)
    perms: dict[int, tuple[int, ...]] = {}

    def swap_last(v: Any, first: int, second: int) -> None:
        n = len(v.shape)
        perms[id(v)] = (n + first, n + second, *range(n - 2))

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, conv):
            swap_last(layer.kernel, -1, -2)
        elif isinstance(layer, depthwise):
            swap_last(layer.kernel, -2, -1)
        elif isinstance(layer, separable):
            swap_last(layer.depthwise_kernel, -2, -1)
            swap_last(layer.pointwise_kernel, -1, -2)
    out: dict[str, tuple[Any, tuple[int, ...]]] = {}
    for v in model.weights:
        if v.path in out:
            raise ValueError(f"two variables of the model share the path '{v.path}'")
        out[v.path] = (v, perms.get(id(v), tuple(range(len(v.shape)))))
    return out


@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """BatchNormalization as one FusedBatchNormV3 (an ONNX BatchNormalization) on NHWC inputs,
    and tf2onnx's Conv+BatchNormalization fusion off, for the duration of one export."""
    import tensorflow as tf
    from keras import layers
    from tf2onnx.optimizer import back_to_back_optimizer as b2b

    original = layers.BatchNormalization.call

    def call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if (
            training
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3)
            or inputs.dtype != "float32"
        ):
            return original(self, inputs, training=training, mask=mask)
        ones = tf.ones((inputs.shape[-1],), inputs.dtype)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            self.gamma if self.scale else ones,
            self.beta if self.center else 0 * ones,
            self.moving_mean,
            self.moving_variance,
            epsilon=self.epsilon,
            data_format="NHWC",
            is_training=False,
        )
        return y

    fusion = ("Conv", "BatchNormalization")
    with _EXPORT_LOCK:
        handler = b2b._func_map.pop(fusion, None)
        layers.BatchNormalization.call = call
        try:
            yield
        finally:
            layers.BatchNormalization.call = original
            if handler is not None:
                b2b._func_map[fusion] = handler


def export_onnx(
    model: Any, input_signature: Sequence[Any], path: str | os.PathLike[str], *, opset: int = 17
) -> None:
    """Export a Keras model to ONNX at ``path`` (atomically) with tf2onnx; ``input_signature`` is
    a tuple of ``tf.TensorSpec`` (their names name the ONNX inputs). Weight-derived constants are
    named by Keras variable paths (``conv2d/kernel``); see the module docstring for why the
    export runs twice with generic values. The model's weights are restored afterwards."""
    import keras
    import tf2onnx

    from morphonnx.export_fix import bind_values
    from morphonnx.formats import atomic_write

    if isinstance(model, keras.Sequential):  # tf2onnx cannot name a Sequential's outputs
        model = keras.Model(model.inputs, model.outputs)
    layouts = keras_layouts(model)
    floats = {p: vp for p, vp in layouts.items() if np.dtype(vp[0].dtype).kind == "f"}
    saved = {p: v.numpy() for p, (v, _) in floats.items()}
    tags: list[dict[str, np.ndarray]] = []
    protos = []
    try:
        for seed in (1, 2):
            rng = np.random.default_rng(seed)
            tag = {p: rng.uniform(0.5, 1.5, v.shape).astype(v.dtype) for p, v in saved.items()}
            for p, (v, _) in floats.items():
                v.assign(tag[p])
            with _exporting(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proto, _ = tf2onnx.convert.from_keras(
                    model, input_signature=tuple(input_signature), opset=opset
                )
            tags.append(tag)
            protos.append(proto)
    finally:
        for p, (v, _) in floats.items():
            v.assign(saved[p])
    proto = bind_values(protos, tags, {p: perm for p, (_, perm) in floats.items()}, saved)
    atomic_write(path, lambda tmp: _save(proto, tmp))


def _save(proto: onnx.ModelProto, tmp: Path) -> None:
    import onnx

    onnx.save(proto, str(tmp))


def export_spec(
    model: Any, input_signature: Sequence[Any], spec_path: str | os.PathLike[str], **kwargs: Any
) -> dict[str, Any]:
    """:func:`export_onnx` + ``morphonnx spec`` in one call; returns the spec (weights do not
    matter: it fits every later export of the same architecture)."""
    from morphonnx.adapterbase import export_and_spec

    return export_and_spec(lambda p: export_onnx(model, input_signature, p, **kwargs), spec_path)


# --------------------------------------------------------------------------- MorphNet regularizer


@functools.cache
def tf_ops() -> Any:
    """:class:`morphonnx.regularize.ArrayOps` for TensorFlow tensors."""
    import tensorflow as tf

    from morphonnx.regularize import ArrayOps

    def rows(x: Any, axis: int) -> Any:
        order = [axis, *(a for a in range(len(x.shape)) if a != axis)]
        return tf.reshape(tf.transpose(x, order), (x.shape[axis], -1))

    return ArrayOps(
        rows=rows,
        take=tf.gather,
        amax=lambda x, axis: tf.reduce_max(x, axis),
        mean=lambda x, axis: tf.reduce_mean(x, axis),
        maximum=tf.maximum,
        count=lambda x: float(tf.reduce_sum(tf.cast(x, tf.float64))),
        cat=lambda xs: tf.concat(xs, 0),
        reshape=tf.reshape,
    )


class Regularizer(RegularizerBase):
    """MorphNet's differentiable cost regularizer for a Keras model, driven by a group spec of
    the model's :func:`export_onnx` (spec tensors are Keras variable paths). Options as in the
    torch adapter (docs/keras.md). ``loss()`` works eagerly, inside ``tf.function``, under
    ``tf.distribute`` replicas and in ``model.fit`` (:meth:`callback`)."""

    def __init__(self, model: Any, spec: Any, *args: Any, **kwargs: Any) -> None:
        import tensorflow as tf

        super().__init__(model, spec, *args, **kwargs)
        self._indices = [tf.constant(a) for a in self.binding.index_arrays()]
        self._segment = tf.constant(self.binding.segment)

    def _array_ops(self) -> Any:
        return tf_ops()

    def _params(self, spec: dict[str, Any]) -> dict[str, Param]:
        layouts = keras_layouts(self.model)
        self._vars = {p: v for p, (v, _) in layouts.items()}
        trainable = {id(v) for v in self.model.trainable_weights}
        return {
            p: Param(p, tuple(v.shape), perm, id(v) in trainable)
            for p, (v, perm) in layouts.items()
        }

    def _flat(self, cast: Any = None) -> Any:
        """Every regularized channel's value in the plan's order (the core's few array ops)."""
        import tensorflow as tf

        xs = [self._vars[s.tensor].value for s in self.binding.sources]
        xs = xs if cast is None else [tf.cast(x, cast) for x in xs]
        return self.binding.values(tf_ops(), xs, self._indices)

    def _coefficients(self, alive: Any) -> tuple[Any, Any]:
        """(cost, coefficients) for these alive counts, looked up in Python (also from inside a
        graph: ``tf.py_function``), so the loss is exact in every execution mode."""
        import tensorflow as tf

        def lookup(a: Any) -> tuple[Any, np.ndarray]:
            value, coef = self.binding.coefficients(self.binding.counts(a.numpy().tolist()))
            self.last_cost = value
            return np.float64(value), coef.astype(np.float32)

        value, coef = tf.py_function(lookup, [alive], [tf.float64, tf.float32])
        coef.set_shape(self._segment.shape)
        return value, tf.stop_gradient(coef)

    def cost_and_loss(self) -> tuple[Any, Any]:
        """(cost of the alive structure as a float64 tensor, differentiable loss) in one pass."""
        import tensorflow as tf

        flat = self._flat()
        alive = tf.math.unsorted_segment_sum(
            tf.cast(tf.stop_gradient(flat) > self.threshold, tf.float64),
            self._segment,
            len(self.binding.gids),
        )
        value, coef = self._coefficients(alive)
        return value, tf.tensordot(tf.cast(flat, tf.float32), coef, 1)

    def cost(self) -> float:
        """Cost of the currently alive structure (FLOPs, weights or seconds, as ``analyze``)."""
        return float(self.cost_and_loss()[0])

    def vectors(self) -> dict[str, np.ndarray]:
        """Regularization vector (one value per channel, float64) of every regularized group."""
        import tensorflow as tf

        flat = self._flat(tf.float64)
        return {k: v.numpy() for k, v in self.binding.split(tf_ops(), flat, self._indices).items()}

    _values64 = vectors

    def callback(self, strength: float) -> Any:
        """A ``keras.callbacks.Callback`` adding ``strength * loss()`` to the model's losses while
        ``fit`` runs (as a regularizer of one source variable) and logging ``morphnet_cost``."""
        import keras

        reg = self
        anchor = self._vars[self.binding.sources[0].tensor]

        class MorphNet(keras.callbacks.Callback):  # type: ignore[misc]
            def on_train_begin(self, logs: Any = None) -> None:
                self.previous = anchor.regularizer

                def term(v: Any) -> Any:
                    extra = strength * reg.loss()
                    return extra if self.previous is None else extra + self.previous(v)

                anchor.regularizer = term

            def on_train_end(self, logs: Any = None) -> None:
                anchor.regularizer = self.previous

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if logs is not None and reg.last_cost is not None:
                    logs["morphnet_cost"] = reg.last_cost

        return MorphNet()

    # ------------------------------------------------------------------ masks and stage 2

    def zero_dead_(self, keep: Any = None) -> dict[str, list[bool]]:
        """Zero every member slice of every dead channel in place (kernels, biases, batch-norm
        parameters and statistics): the model then computes what the pruned ONNX computes."""
        keep, cuts = self._cuts(keep, strict=True)
        for path, axes in cuts.items():
            value = self._vars[path].numpy()
            for axis, idx in axes.items():
                value[(slice(None),) * axis + (np.asarray(idx),)] = 0
            self._vars[path].assign(value)
        return keep

    def slice_model(self, keep: Any = None) -> Any:
        """A new functional (or Sequential) Keras model with the dead channels removed: layer
        configs resized (``filters``/``units``), weights copied. It computes what ``zero_dead_``
        computes. A layer whose weights cannot take the sliced shapes is a ``TypeError``."""
        _, kept = self._kept(keep)
        values = {}
        for path, v in self._vars.items():
            value = v.numpy()
            for axis, idx in kept.get(path, {}).items():
                value = np.take(value, idx, axis)
            values[path] = value
        config = self.model.get_config()
        if not isinstance(config, dict) or "layers" not in config:
            raise TypeError("slice_model needs a functional or Sequential Keras model")
        for conf in config["layers"]:
            if conf.get("class_name") != "InputLayer":
                conf.pop("build_config", None)  # built again from the (sliced) inputs
                layer = self.model.get_layer(conf["config"]["name"])
                conf["config"].update(_resized(layer, values))
        small = type(self.model).from_config(config)
        for layer in self.model.layers:
            new = small.get_layer(layer.name)
            shapes = [values[v.path].shape for v in layer.weights]
            if [tuple(w.shape) for w in new.weights] != shapes:
                raise TypeError(
                    f"slice_model: cannot resize layer '{layer.name}' "
                    f"({type(layer).__name__}) to {shapes}; covered: Conv*/SeparableConv*/"
                    "DepthwiseConv*/Conv*Transpose, Dense, BatchNormalization and layers sized "
                    "by their input"
                )
            new.set_weights([values[v.path] for v in layer.weights])
        return small


def _resized(layer: Any, values: dict[str, np.ndarray]) -> dict[str, int]:
    """The config change that gives ``layer`` its sliced output width."""
    from keras import layers

    transposed = (layers.Conv1DTranspose, layers.Conv2DTranspose, layers.Conv3DTranspose)
    if isinstance(layer, transposed):
        return {"filters": values[layer.kernel.path].shape[-2]}
    if isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        return {"filters": values[layer.pointwise_kernel.path].shape[-1]}
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D)):
        return {"filters": values[layer.kernel.path].shape[-1]}
    if isinstance(layer, layers.Dense):
        return {"units": values[layer.kernel.path].shape[-1]}
    return {}
