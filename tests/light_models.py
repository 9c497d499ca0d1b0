"""Access to the model-zoo graphs that ship inside the ``onnx`` package.

``onnx/backend/test/data/light/*.onnx`` holds nine real ImageNet classifiers
(AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet v1, SqueezeNet,
VGG-19, ZFNet-512).  To keep the wheel small their large weights are not stored:
each one is produced at run time by a ``ConstantOfShape`` node, so every filter
of a layer is identical (all 0.02).  That is useless for pruning tests, so
:func:`materialize_weights` replaces those nodes with random initializers.

This module deliberately imports nothing from ``morphonnx``: it is used to
check morphonnx against independently made counts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "LIGHT_DIR",
    "light_model_paths",
    "load_light_model",
    "materialize_weights",
    "random_inputs",
]

LIGHT_DIR = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"

# Ops that only move or re-view a tensor: a rank-1 tensor reaching a BN/Mul
# through them is still "a scale" for the purpose of choosing its values.
_PASS_THROUGH = {"Unsqueeze", "Reshape", "Identity", "Cast", "Flatten", "Squeeze", "Expand"}


def light_model_paths() -> dict[str, Path]:
    """Map short model name ("resnet50", "bvlc_alexnet", ...) to its ``.onnx`` path."""
    out: dict[str, Path] = {}
    for p in sorted(LIGHT_DIR.glob("light_*.onnx")):
        out[p.stem[len("light_") :]] = p
    return out


def load_light_model(name: str) -> onnx.ModelProto:
    """Load one light model by short name (see :func:`light_model_paths`)."""
    return onnx.load(str(light_model_paths()[name]))


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of the integer tensors that are constant by construction
    (initializers and ``Constant`` outputs): candidate shape inputs."""
    vals: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32):
            vals[t.name] = numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type != "Constant" or not node.output:
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type in (TensorProto.INT64, TensorProto.INT32):
                vals[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name == "value_ints":
                vals[node.output[0]] = np.asarray(list(a.ints), dtype=np.int64)
            elif a.name == "value_int":
                vals[node.output[0]] = np.asarray(a.i, dtype=np.int64)
    return vals


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    cons: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                cons.setdefault(name, []).append((node, i))
    return cons


def _final_uses(
    name: str, cons: dict[str, list[tuple[onnx.NodeProto, int]]], depth: int = 0
) -> list[tuple[onnx.NodeProto, int]]:
    """Consumers of ``name``, looking through pure re-view ops (Unsqueeze, ...)."""
    uses: list[tuple[onnx.NodeProto, int]] = []
    for node, idx in cons.get(name, []):
        if node.op_type in _PASS_THROUGH and idx == 0 and depth < 8 and node.output:
            uses.extend(_final_uses(node.output[0], cons, depth + 1))
        else:
            uses.append((node, idx))
    return uses


def names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Tensor names read by ``nodes``, including from inside their subgraphs."""
    names: set[str] = set()
    for n in nodes:
        names.update(x for x in n.input if x)
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= names_read(sg.node) | {o.name for o in sg.output}
    return names


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _fan_in(shape: tuple[int, ...], uses: list[tuple[onnx.NodeProto, int]]) -> int:
    """Fan-in of a weight: prod(shape[1:]) (Conv / Gemm with transB=1 layout),
    except where the consumer says the contraction axis is elsewhere."""
    for node, idx in uses:
        if node.op_type == "Gemm" and idx == 1 and len(shape) == 2:
            return shape[0] if attr_int(node, "transB", 0) == 0 else shape[1]
        if node.op_type == "MatMul" and idx == 1 and len(shape) >= 2:
            return shape[-2]
        if node.op_type == "ConvTranspose" and idx == 1 and len(shape) >= 2:
            return int(shape[0] * np.prod(shape[2:]))
    return int(np.prod(shape[1:])) if len(shape) > 1 else max(int(shape[0]), 1)


def _random_values(
    shape: tuple[int, ...],
    uses: list[tuple[onnx.NodeProto, int]],
    rng: np.random.Generator,
) -> np.ndarray:
    if len(shape) >= 2:
        # He-normal: var = 2 / fan_in keeps ReLU nets' activations O(1).
        std = np.float32(np.sqrt(2.0 / max(_fan_in(shape, uses), 1)))
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= std
        return w
    # Rank 0/1: biases and normalisation parameters.
    is_scale = any(
        (node.op_type == "BatchNormalization" and idx in (1, 4))
        or (node.op_type in ("Mul", "Div") and idx in (0, 1))
        for node, idx in uses
    )
    if is_scale:
        # BN scale (input 1) / variance (input 4), and Caffe2-style "Scale"
        # layers (Unsqueeze -> Mul, as in DenseNet / Inception v2): near 1 so
        # the network keeps activations at a sensible magnitude.
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    b = rng.standard_normal(shape, dtype=np.float32)
    b *= np.float32(0.1)
    return b


def materialize_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Copy of ``model`` whose ``ConstantOfShape`` weights are real initializers.

    Every ``ConstantOfShape`` node whose shape input is constant (an initializer
    or a ``Constant`` node) and whose fill value is float32 (the default) is
    replaced by a float32 initializer of that shape under the same output
    tensor name, filled with distinct random values:

    * rank >= 2 (conv / fc weights): He-normal, ``std = sqrt(2 / fan_in)``,
      fan_in = ``prod(shape[1:])`` (for a Gemm ``B`` with ``transB=0`` or a
      MatMul ``B`` the contraction axis is used instead);
    * rank <= 1 feeding a BatchNormalization as input 1 (scale) or 4 (variance),
      or a Mul/Div (Caffe2 "Scale" layers, possibly through Unsqueeze/Reshape):
      ``uniform(0.5, 1.5)``;
    * other rank <= 1 tensors (biases, BN bias / mean): ``normal * 0.1``.

    The shape constants of replaced nodes, once nothing else reads them, are
    removed (initializer and its IR<=3 graph-input entry, or the ``Constant``
    node); no other tensor or node is touched.  For IR version <= 3, where initializers
    must also be graph inputs, the new initializers are added as graph inputs.
    ``seed`` makes the result deterministic.
    """
    m = copy.deepcopy(model)
    g = m.graph
    rng = np.random.default_rng(seed)
    consts = _constant_values(g)
    cons = _consumers(g)

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[tuple[str, np.ndarray]] = []
    shape_names: set[str] = set()
    for node in g.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in consts:
            new_nodes.append(node)
            continue
        fill_dtype = TensorProto.FLOAT
        for a in node.attribute:
            if a.name == "value":
                fill_dtype = a.t.data_type
        if fill_dtype != TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        shape = tuple(int(d) for d in np.asarray(consts[node.input[0]]).reshape(-1))
        out = node.output[0]
        arr = _random_values(shape, _final_uses(out, cons), rng)
        new_inits.append((out, arr))
        shape_names.add(node.input[0])

    # Drop the shape constants of replaced nodes that nobody reads any more
    # (other dead tensors are left alone).
    used = names_read(new_nodes) | {o.name for o in g.output}
    dead = shape_names - used
    kept_nodes = [
        n for n in new_nodes if not (n.op_type == "Constant" and n.output and n.output[0] in dead)
    ]
    kept_inits = [t for t in g.initializer if t.name not in dead]
    removed = {t.name for t in g.initializer} - {t.name for t in kept_inits}

    del g.node[:]
    g.node.extend(kept_nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    for name, arr in new_inits:
        # Filled in place: numpy_helper.from_array + extend would copy the
        # bytes twice more, which matters for VGG's 143M weights.
        t = g.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.raw_data = arr.astype("<f4", copy=False).tobytes()

    kept_inputs = [i for i in g.input if i.name not in removed]
    if m.ir_version <= 3:
        for name, arr in new_inits:
            kept_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, arr.shape))
    del g.input[:]
    g.input.extend(kept_inputs)
    # value_info for the replaced tensors would now be redundant but harmless;
    # drop entries describing tensors that no longer exist.
    existing = (
        {t.name for t in g.initializer}
        | {i.name for i in g.input}
        | {o for n in g.node for o in n.output}
    )
    vi = [v for v in g.value_info if v.name in existing]
    del g.value_info[:]
    g.value_info.extend(vi)
    return m


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for the graph's real inputs (graph inputs that are not
    initializers).  Floating inputs get ``normal(0, 1)`` (float32 unless the
    input declares another float type), integer/bool inputs get zeros.
    Symbolic, unknown or zero dims are set to 1."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim
        ]
        dtype = _np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds
