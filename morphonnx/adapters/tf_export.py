"""Keras 3 models as ONNX files (tf2onnx) whose structure and names depend neither on weight
values nor on per-process counters, so a spec made once maps onto every later export.

tf2onnx folds batch norms into convolutions, drops zero biases, merges equal constants and names
tensors with process-wide counters, so its output depends on the weights' values and on how many
exports ran before. :func:`export_onnx` therefore exports twice with generic random values in
every variable (no zeros, no equal tensors), keeps BatchNormalization as its own node (its gamma
is MorphNet's signal, and the spec must see it), identifies every ONNX constant as one Keras
variable in ONNX layout (a constant that is a mix of weights is refused: its values could not be
written exactly), names it by the variable's path and strips the counters from every other name.
The value binding itself is :func:`morphonnx.export_fix.bind_values`. tensorflow is imported
lazily.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx

    from morphonnx.formats import Attention

__all__ = ["export_onnx", "export_spec", "keras_layouts"]

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
    model: Any,
    input_signature: Sequence[Any],
    spec_path: str | os.PathLike[str],
    attention: Attention = "dims",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`export_onnx` + ``morphonnx spec`` in one call; returns the spec (weights do not
    matter: it fits every later export of the same architecture). ``attention``: ``"heads"``
    groups attention by whole heads (``morphonnx spec --attention``)."""
    from morphonnx.adapterbase import export_and_spec

    return export_and_spec(
        lambda p: export_onnx(model, input_signature, p, **kwargs), spec_path, attention
    )
