"""Graphs built in code with the patterns that exporters nobody here controls emit (tf2onnx,
keras2onnx, paddle2onnx, jax2tf), each in several variants (opset, static or dynamic shapes, fused
or unfused forms). Every builder returns a :class:`~onnx_builders.Builder` ready to save.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import FLOAT, INT64, Builder


def _ints(b: Builder, values: list[int], dtype: type = np.int64) -> str:
    b._count += 1
    return b.init(f"c{b._count}", np.array(values, dtype=dtype))


def same_pads(b: Builder, x: str, rank: int, spatial: list[int], k: int, s: int, form: str) -> str:
    """The pads vector of TF "same" padding computed at run time from ``Shape(x)``:
    ``total = max((ceil(in / s) - 1) * s + k - in, 0)``, ``begin = total // 2``, ``end = total -
    begin``. ``form``: ``float`` (Cast to float, Div, Ceil, Cast back: tf2onnx / paddle),
    ``int`` (integer Div of ``in + s - 1``), ``where`` (Where(Greater) instead of Max, Mod for the
    odd pixel: keras2onnx-style)."""
    shape = b.node("Shape", [x])
    dims = b.node("Gather", [shape, _ints(b, spatial)], axis=0)
    if form == "float":
        f = b.node("Cast", [dims], to=TensorProto.FLOAT)
        step = b.init(f"s{b._count}", np.array(float(s), dtype=np.float32))
        out = b.node("Cast", [b.node("Ceil", [b.node("Div", [f, step])])], to=TensorProto.INT64)
    else:
        plus = b.node("Add", [dims, _ints(b, [s - 1])])
        out = b.node("Div", [plus, _ints(b, [s])])
    span = b.node(
        "Add", [b.node("Mul", [b.node("Sub", [out, _ints(b, [1])]), _ints(b, [s])]), _ints(b, [k])]
    )
    need = b.node("Sub", [span, dims])
    zero = _ints(b, [0])
    if form == "where":
        total = b.node("Where", [b.node("Greater", [need, zero]), need, zero])
        begin = b.node("Div", [total, _ints(b, [2])])
        end = b.node("Add", [begin, b.node("Mod", [total, _ints(b, [2])])])
    else:
        total = b.node("Max", [need, zero])
        begin = b.node("Div", [total, _ints(b, [2])])
        end = b.node("Sub", [total, begin])
    before, after = [], []
    it = iter(range(len(spatial)))
    for axis in range(rank):
        if axis in spatial:
            j = next(it)
            before.append(b.node("Slice", [begin, _ints(b, [j]), _ints(b, [j + 1]), _ints(b, [0])]))
            after.append(b.node("Slice", [end, _ints(b, [j]), _ints(b, [j + 1]), _ints(b, [0])]))
        else:
            before.append(zero)
            after.append(zero)
    return b.node("Concat", before + after, axis=0)


def valid_conv(
    b: Builder, x: str, cin: int, cout: int, k: int, prefix: str, stride: int = 1
) -> str:
    """Conv without padding of its own (the Pad before it does the padding)."""
    w, bias = b.init(f"{prefix}.weight", [cout, cin, k, k]), b.init(f"{prefix}.bias", [cout])
    return b.node(
        "Conv",
        [x, w, bias],
        f"{prefix}.out",
        name=prefix,
        kernel_shape=[k, k],
        strides=[stride] * 2,
    )


def tf_same_conv_net(opset: int, dynamic: bool, form: str, nhwc: bool = False) -> Builder:
    """Three convs with TF "same" padding computed at run time (stride 2, 2, 1), a residual Add,
    global pool -> flatten -> gemm. The second Pad (stride 2) pads a prunable tensor by amounts
    that depend on its spatial size. With ``nhwc`` the input is NHWC and each Pad pads NHWC
    tensors, transposed to NCHW for the convs, as tf2onnx does."""
    b = Builder(opset)
    if nhwc:
        x = b.input("x", ["N", "H", "W", 3] if dynamic else [1, 16, 12, 3])
    else:
        x = b.input("x", ["N", 3, "H", "W"] if dynamic else [1, 3, 16, 12])
    spatial = [1, 2] if nhwc else [2, 3]

    def same_conv(t: str, cin: int, cout: int, stride: int, prefix: str) -> str:
        padded = b.node("Pad", [t, same_pads(b, t, 4, spatial, 3, stride, form)], mode="constant")
        if nhwc:
            padded = b.node("Transpose", [padded], perm=[0, 3, 1, 2])
        y = b.relu(valid_conv(b, padded, cin, cout, 3, prefix, stride))
        return b.node("Transpose", [y], perm=[0, 2, 3, 1]) if nhwc else y

    y = same_conv(x, 3, 8, 2, "conv1")
    y = same_conv(y, 8, 6, 2, "conv2")
    z = same_conv(y, 6, 6, 1, "conv3")
    z = b.node("Add", [z, y])
    if opset < 18:
        pooled = b.node("ReduceMean", [z], axes=spatial, keepdims=0)
    else:
        pooled = b.node("ReduceMean", [z, _ints(b, spatial)], keepdims=0)
    b.gemm(pooled, 6, 4, prefix="fc")
    b.output("fc.out")
    return b


def _dense(b: Builder, t: str, w: str, cout: int, tensordot: bool) -> str:
    """A Dense layer on an NHWC tensor: MatMul, or keras 2's ``Tensordot`` as tf2onnx writes it
    (Reshape to ``[prod(N, H, W), C]`` computed with ReduceProd, MatMul, Reshape back to
    ``Concat(Shape(t)[:3], [cout])``: the output width is a constant inside a run-time target)."""
    if not tensordot:
        return b.node("MatMul", [t, w])
    shape = b.node("Shape", [t])
    free = b.node("Gather", [shape, _ints(b, [0, 1, 2])], axis=0)
    rows = b.node("ReduceProd", [free], keepdims=1)
    cols = b.node("Gather", [shape, _ints(b, [3])], axis=0)
    flat = b.node("Reshape", [t, b.node("Concat", [rows, cols], axis=0)])
    out = b.node("MatMul", [flat, w])
    return b.node("Reshape", [out, b.node("Concat", [free, _ints(b, [cout])], axis=0)])


def convnext_block(
    opset: int, dynamic: bool, fused: bool, dim: int = 8, tensordot: bool = False
) -> Builder:
    """stem conv -> depthwise 7x7 -> Transpose NHWC -> LayerNorm (fused op, or ReduceMean/Sub/
    Pow/Sqrt/Div before opset 17) -> MatMul 4x -> Gelu (erf form unless ``fused`` at opset 20) ->
    MatMul back -> layer-scale Mul -> Transpose NCHW -> residual Add -> pool -> Gemm."""
    b = Builder(opset)
    x = b.input("x", ["N", 3, "H", "W"] if dynamic else [2, 3, 9, 9])
    stem = b.conv(x, 3, dim, 3, prefix="stem")
    dw = b.conv(stem, dim, dim, 7, prefix="dw", group=dim)
    t = b.node("Transpose", [dw], perm=[0, 2, 3, 1])
    gamma, beta = b.init("ln.weight", [dim]), b.init("ln.bias", [dim])
    if fused and opset >= 17:
        n = b.node("LayerNormalization", [t, gamma, beta], axis=-1, epsilon=1e-6)
    else:
        axes = {"axes": [-1]} if opset < 18 else {}
        extra = [] if opset < 18 else [_ints(b, [-1])]
        mean = b.node("ReduceMean", [t, *extra], **axes)
        d = b.node("Sub", [t, mean])
        var = b.node(
            "ReduceMean",
            [b.node("Pow", [d, b.init("two", np.array(2.0, np.float32))]), *extra],
            **axes,
        )
        std = b.node("Sqrt", [b.node("Add", [var, b.init("eps", np.array(1e-6, np.float32))])])
        n = b.node("Add", [b.node("Mul", [b.node("Div", [d, std]), gamma]), beta])
    h = b.node(
        "Add",
        [
            _dense(b, n, b.init("pw1.weight", [dim, 4 * dim]), 4 * dim, tensordot),
            b.init("pw1.bias", [4 * dim]),
        ],
    )
    if fused and opset >= 20:
        g = b.node("Gelu", [h])
    else:
        r2 = b.init("sqrt2", np.array(np.sqrt(2.0), np.float32))
        erf = b.node("Erf", [b.node("Div", [h, r2])])
        one, half = (
            b.init("one", np.array(1.0, np.float32)),
            b.init("half", np.array(0.5, np.float32)),
        )
        g = b.node("Mul", [b.node("Mul", [h, b.node("Add", [erf, one])]), half])
    o = b.node(
        "Add",
        [
            _dense(b, g, b.init("pw2.weight", [4 * dim, dim]), dim, tensordot),
            b.init("pw2.bias", [dim]),
        ],
    )
    o = b.node("Mul", [o, b.init("layer_scale", [dim])])
    back = b.node("Transpose", [o], perm=[0, 3, 1, 2])
    res = b.node("Add", [stem, back])
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [res])], axis=1)
    b.gemm(flat, dim, 5, prefix="fc")
    b.output("fc.out")
    return b


def reshape_head(opset: int, target: list[int], form: str, cout: int = 6) -> Builder:
    """conv -> relu -> global pool -> Reshape to a target such as ``[1, C]`` (paddle2onnx's head)
    -> MatMul + Add. ``form``: ``initializer``, ``constant_node``, or ``computed``: the batch
    entry read from ``Shape`` at run time and concatenated with the constant rest (dynamic
    batch)."""
    b = Builder(opset)
    x = b.input("x", ["N", 3, 8, 8] if form == "computed" else [1, 3, 8, 8])
    y = b.relu(b.conv(x, 3, cout, 3, prefix="conv"))
    pooled = b.node("GlobalAveragePool", [y])
    values = np.array(target, dtype=np.int64)
    if form == "constant_node":
        shape = b.node("Constant", [], value=numpy_helper.from_array(values, "target"))
    elif form == "computed":
        batch = b.node("Slice", [b.node("Shape", [pooled]), _ints(b, [0]), _ints(b, [1])])
        shape = b.node("Concat", [batch, b.init("target", values[1:])], axis=0)
    else:
        shape = b.init("target", values)
    flat = b.node("Reshape", [pooled, shape])
    logits = b.node("MatMul", [flat, b.init("fc.weight", [cout, 4])])
    b.node("Add", [logits, b.init("fc.bias", [4])], "out")
    b.outputs.append(
        helper.make_tensor_value_info("out", FLOAT, ["N" if form == "computed" else 1, 4])
    )
    return b


def int32_slice_net(opset: int, dtype: type, with_steps: bool) -> Builder:
    """conv -> Slice of channels 2..6 with bounds (and axes, steps) of ``dtype`` (jax2tf writes
    int32) -> conv; and a second Slice on a spatial axis, also ``dtype``."""
    b = Builder(opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 3, 8, 3, prefix="conv1"))
    ins = [y, _ints(b, [2], dtype), _ints(b, [6], dtype), _ints(b, [1], dtype)]
    if with_steps:
        ins.append(_ints(b, [1], dtype))
    part = b.node("Slice", ins)
    z = b.conv(part, 4, 5, 3, prefix="conv2")
    crop = b.node("Slice", [z, _ints(b, [1], dtype), _ints(b, [7], dtype), _ints(b, [3], dtype)])
    b.node("ReduceMean", [crop], "out", axes=[2, 3], keepdims=0) if opset < 18 else b.node(
        "ReduceMean", [crop, _ints(b, [2, 3])], "out", keepdims=0
    )
    b.output("out")
    return b


__all__ = [
    "FLOAT",
    "INT64",
    "convnext_block",
    "int32_slice_net",
    "reshape_head",
    "tf_same_conv_net",
]


def data_dependent_pad_net(opset: int = 13) -> Builder:
    """conv -> Pad by an amount computed from the input's *values* (nothing can know it before
    run time) -> conv -> relu -> conv -> output: the shapes after the Pad stay unknown."""
    b = Builder(opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 3, 4, 3, prefix="conv1"))
    amount = b.node("Cast", [b.node("ReduceMax", [x], keepdims=0)], to=TensorProto.INT64)
    amount = b.node("Unsqueeze", [b.node("Relu", [amount]), _ints(b, [0])])
    zeros = _ints(b, [0, 0])
    pads = b.node("Concat", [zeros, amount, amount, zeros, amount, amount], axis=0)
    y = b.node("Pad", [y, pads], mode="constant")
    y = b.relu(b.conv(y, 4, 5, 3, prefix="conv2"))
    b.conv(y, 5, 2, 1, prefix="conv3")
    b.output("conv3.out")
    return b


def computed_shape_net(op: str, opset: int = 13) -> Builder:
    """conv -> ``op`` (Expand, or Resize's sizes) to ``Concat(Shape(y)[0:1], [C], Shape(y)[2:])``:
    a run-time shape that holds the channel count as a constant. The rewrite fixes an Expand's
    (as a Reshape target's); a Resize's no rewrite knows how to change: pruning the conv's
    channels would break it, so the dry run must report the group unprunable. conv2's group
    (4 channels) is fine."""
    b = Builder(opset)
    x = b.input("x", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 3, 6, 3, prefix="conv1"))
    shape = b.node("Shape", [y])
    batch = b.node("Slice", [shape, _ints(b, [0]), _ints(b, [1])])
    space = b.node("Slice", [shape, _ints(b, [2]), _ints(b, [4])])
    target = b.node("Concat", [batch, _ints(b, [6]), space], axis=0)
    inputs = [y, target] if op == "Expand" else [y, "", "", target]
    y = b.node(op, inputs, **({} if op == "Expand" else {"mode": "nearest"}))
    y = b.relu(b.conv(y, 6, 4, 1, prefix="conv2"))
    b.conv(y, 4, 2, 1, prefix="conv3")
    b.output("conv3.out")
    return b
