"""Keras 3 (TensorFlow) side of MorphNet's training: the regularizer's tensor ops (eager, in
``tf.function``, under ``tf.distribute``, in ``model.fit``) and stage 2 (zeroing, slicing
layers), on the framework-neutral core (:mod:`morphonnx.binding`, :mod:`morphonnx.adapterbase`).
The export is :mod:`morphonnx.adapters.tf_export` (re-exported here). tensorflow is imported
lazily.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from morphonnx.adapterbase import RegularizerBase
from morphonnx.adapters.tf_export import export_onnx, export_spec, keras_layouts
from morphonnx.binding import Param

__all__ = ["Regularizer", "export_onnx", "export_spec", "keras_layouts", "tf_ops"]


@functools.cache
def tf_ops() -> Any:
    """:class:`morphonnx.regularize.ArrayOps` for TensorFlow tensors."""
    import tensorflow as tf

    from morphonnx.regularize import ArrayOps

    def rows(x: Any, axis: int) -> Any:
        order = [axis, *(a for a in range(len(x.shape)) if a != axis)]
        return tf.reshape(tf.transpose(x, order), (x.shape[axis], -1))

    def rms(x: Any, axis: int) -> Any:
        """The backward is one pass (x times a per-filter scale; autodiff's takes three) and 0
        at a filter of zeros, where sqrt's own gradient is NaN (as in the torch adapter)."""
        others = [a for a in range(len(x.shape)) if a != axis]
        if not others:
            return tf.abs(x)
        count = float(x.shape.num_elements() // x.shape[axis])

        @tf.custom_gradient
        def root_mean_square(x: Any) -> tuple[Any, Any]:
            r = tf.sqrt(tf.reduce_mean(tf.square(x), others, keepdims=True))

            def grad(g: Any) -> Any:
                return x * tf.math.divide_no_nan(tf.reshape(g, tf.shape(r)), r * count)

            return tf.reshape(r, [-1]), grad

        return root_mean_square(x)

    return ArrayOps(
        rows=rows,
        take=tf.gather,
        amax=lambda x, axis: tf.reduce_max(x, axis),
        mean=lambda x, axis: tf.reduce_mean(x, axis),
        rms=rms,
        maximum=tf.maximum,
        count=lambda x: float(tf.reduce_sum(tf.cast(x, tf.float64))),
        cat=lambda xs: tf.concat(xs, 0),
        reshape=tf.reshape,
        transpose=tf.transpose,
    )


class Regularizer(RegularizerBase):
    """MorphNet's differentiable cost regularizer for a Keras model, driven by a group spec of
    the model's :func:`export_onnx` (spec tensors are Keras variable paths). Options as in the
    torch adapter (docs/keras.md). ``loss()`` works eagerly, inside ``tf.function``, under
    ``tf.distribute`` replicas and in ``model.fit`` (:meth:`callback`)."""

    def __init__(self, model: Any, spec: Any, *args: Any, **kwargs: Any) -> None:
        import tensorflow as tf

        super().__init__(model, spec, *args, **kwargs)
        self._indices = self.binding.indices(tf.constant)

    def _array_ops(self) -> Any:
        return tf_ops()

    def _params(self, spec: dict[str, Any]) -> dict[str, Param]:
        layouts = keras_layouts(self.model)
        self._vars = {p: v for p, (v, _) in layouts.items()}
        # a frozen layer's (``trainable = False``) weights are still weights, as a torch
        # parameter with requires_grad off is: regularized without a gradient, never refused
        layers = self.model._flatten_layers(include_self=True, recursive=True)
        learnable = {id(v) for layer in layers for v in layer._trainable_variables}
        learnable |= {id(v) for v in self.model.trainable_weights}
        return {
            p: Param(p, tuple(v.shape), perm, id(v) in learnable)
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
        coef.set_shape(self._indices.segment.shape)
        return value, tf.stop_gradient(coef)

    def cost_and_loss(self) -> tuple[Any, Any]:
        """(cost of the alive structure as a float64 tensor, differentiable loss) in one pass."""
        import tensorflow as tf

        flat = self._flat()
        alive = tf.math.unsorted_segment_sum(
            tf.cast(tf.stop_gradient(flat) > self.threshold, tf.float64),
            self._indices.segment,
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
        self._zero(self._vars, cuts)
        return keep

    def _zero(self, variables: dict[str, Any], cuts: Any) -> None:
        for path, axes in cuts.items():
            p = self.binding.params[path]
            value = p.to_view(variables[path].numpy())
            for axis, idx in axes.items():
                value[(slice(None),) * axis + (np.asarray(idx),)] = 0
            variables[path].assign(p.from_view(value))

    def _zeroed_copy(self, keep: Any) -> Any:
        import keras

        clone = keras.models.clone_model(self.model)
        clone.set_weights(self.model.get_weights())
        variables = dict(zip((v.path for v in self.model.weights), clone.weights, strict=True))
        self._zero(variables, self._cuts(keep, strict=True)[1])
        return clone

    def _outputs(self, model: Any, inputs: Any) -> list[np.ndarray]:
        """Without TF32 (GPUs round matmul inputs to 10 bits otherwise), as float64 arrays."""
        import tensorflow as tf

        many = isinstance(inputs, (tuple, list))
        args = (list(inputs) if len(inputs) > 1 else inputs[0]) if many else inputs
        tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            out = tf.nest.flatten(model(args, training=False))
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(tf32)
        return [np.asarray(tf.cast(t, tf.float64) if t.dtype.is_floating else t) for t in out]

    def _check_rtol(self) -> float:
        """Layers computing in 16 bits (a mixed-precision policy) round at about 1e-3."""
        from morphonnx.verify import RTOL

        half = any(
            getattr(layer, "compute_dtype", "float32") in ("float16", "bfloat16")
            for layer in self.model._flatten_layers(include_self=False, recursive=True)
        )
        return 2e-2 if half else RTOL

    def slice_model(
        self,
        keep: Any = None,
        fold_constants: bool = False,
        input_signature: Any = None,
        example_inputs: Any = None,
        check: bool = True,
    ) -> Any:
        """A new functional (or Sequential) Keras model with the dead channels removed: layer
        configs resized (``filters``/``units``), weights copied. It computes what ``zero_dead_``
        computes. ``fold_constants``: each dead channel's constant output is added to the biases
        of the layers it feeds (as ``morphonnx prune --fold-constants``; a bias is created where
        a layer has none; exact away from zero-padded borders, which a warning sizes), found on
        an export of the current model with ``input_signature`` (default: inputs of the spec's
        shapes and types). ``check``: the sliced model and a zeroed clone run on
        ``example_inputs`` (arrays; default: the spec's shapes and types, standard normal floats,
        zeros for integers) and a failure or a difference is a ``ValueError``. A layer whose
        weights cannot take the sliced shapes is a ``TypeError``."""
        keep, kept = self._kept(keep)
        folds = self._folds(keep, input_signature) if fold_constants else {}
        values = {}
        for path, v in self._vars.items():
            try:
                values[path] = self.binding.params[path].sliced(v.numpy(), kept.get(path, {}))
            except ValueError as exc:
                raise TypeError(f"slice_model: cannot slice {exc}") from None
        config = self.model.get_config()
        if not isinstance(config, dict) or "layers" not in config:
            raise TypeError("slice_model needs a functional or Sequential Keras model")
        for conf in config["layers"]:
            if conf.get("class_name") != "InputLayer":
                conf.pop("build_config", None)  # built again from the (sliced) inputs
                layer = self.model.get_layer(conf["config"]["name"])
                conf["config"].update(_resized(layer, values))
                _keep_attention_scale(layer, conf["config"], values)
                if layer.name in folds:
                    conf["config"]["use_bias"] = True
        small = type(self.model).from_config(config)
        for layer in self.model.layers:
            new = small.get_layer(layer.name)
            weights = [values[v.path] for v in layer.weights]
            if layer.name in folds:
                delta = folds[layer.name].astype(np.float32)
                if getattr(layer, "bias", None) is None:
                    weights.append(delta)  # Keras puts the bias last
                else:
                    at = [v.path for v in layer.weights].index(layer.bias.path)
                    weights[at] = weights[at] + delta
            shapes = [w.shape for w in weights]
            if [tuple(w.shape) for w in new.weights] != shapes:
                raise TypeError(
                    f"slice_model: cannot resize layer '{layer.name}' "
                    f"({type(layer).__name__}) to {shapes}; covered: Conv*/SeparableConv*/"
                    "DepthwiseConv*/Conv*Transpose, Dense, MultiHeadAttention, BatchNormalization "
                    "and layers sized by their input"
                )
            new.set_weights(weights)
        inputs = example_inputs
        if check and inputs is None:
            inputs = self._example_arrays(required=False)
        if check and inputs is not None:
            unfolded = self.slice_model(keep, check=False) if folds else small
            self._check_sliced(unfolded, keep, inputs)
        return small

    def _folds(self, keep: Any, input_signature: Any) -> dict[str, np.ndarray]:
        """Layer name -> what its bias must add (``RegularizerBase._bias_deltas``)."""
        import tensorflow as tf

        types = self.spec["model"].get("input_types") or {}
        sig = input_signature or tuple(
            tf.TensorSpec(shape, tf.as_dtype(types.get(name) or "float32"), name=name)
            for name, shape in self.spec["model"]["inputs"].items()
        )
        owner = {v.path: layer for layer in self.model.layers for v in layer.weights}
        folds: dict[str, np.ndarray] = {}
        export = lambda p: export_onnx(self.model, sig, p)  # noqa: E731
        for weight, delta in self._bias_deltas(keep, export):
            name = owner[weight].name
            folds[name] = folds.get(name, 0) + delta
        return folds


def _keep_attention_scale(layer: Any, config: dict[str, Any], values: dict[str, Any]) -> None:
    """MultiHeadAttention scales q·kᵀ by ``1/sqrt(key_dim)`` from its config: with fewer key
    dims the rebuilt layer would scale otherwise, so q's kernel and bias absorb the change and
    the sliced model computes what the zeroed one does (the pruned ONNX keeps its constant)."""
    from keras import layers

    if not isinstance(layer, layers.MultiHeadAttention):
        return
    factor = np.sqrt(config["key_dim"] / layer.get_config()["key_dim"])
    if factor != 1:
        for v in layer._query_dense.weights:
            values[v.path] = (values[v.path] * factor).astype(values[v.path].dtype)


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
    if isinstance(layer, layers.MultiHeadAttention):  # kernels (E, H, D); output (H, D, E)
        q, v = (values[d.kernel.path].shape for d in (layer._query_dense, layer._value_dense))
        return {"num_heads": q[1], "key_dim": q[2], "value_dim": v[2]}
    return {}
