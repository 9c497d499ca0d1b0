"""Constant folding of the small subgraphs exporters put between a weight and its use.

Old exporters and tf2onnx wrap per-channel weights in ``Unsqueeze`` / ``Reshape`` / ``Cast`` or
compute them (``gamma / sqrt(var + eps)``). A node whose inputs are all constants and whose op is
in this table yields a *folded* constant: a weight in its own right, with its own name, sliced and
written as an initializer by ``prune``. Values are computed with numpy only when needed (never
by analyze).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from onnx import helper, numpy_helper

from morphonnx.ir import Node, Shape

Fold = Callable[[Node, Sequence[np.ndarray | None]], np.ndarray]


def _axes(node: Node, inputs: Sequence[np.ndarray | None], rank: int) -> list[int]:
    raw = node.attr("axes")
    if raw is None and len(inputs) > 1 and inputs[1] is not None:
        raw = inputs[1].tolist()
    return sorted(int(a) % rank for a in (raw or []))


def _unsqueeze(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    raw = node.attr("axes")
    if raw is None and inputs[1] is not None:
        raw = inputs[1].tolist()
    rank = x.ndim + len(raw or [])
    return np.expand_dims(x, tuple(sorted(int(a) % rank for a in raw or [])))


def _squeeze(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    axes = _axes(node, inputs, x.ndim)
    return np.squeeze(x, tuple(axes)) if axes else np.squeeze(x)


def _reshape(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x, shape = inputs[0], inputs[1]
    assert x is not None
    if shape is None:
        shape = np.array(node.attr("shape"))
    target = [int(d) for d in shape.tolist()]
    if not node.attr("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _transpose(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    perm = node.attr("perm")
    return np.transpose(x, perm) if perm is not None else x.T


def _flatten(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    axis = int(node.attr("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _cast(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None
    return x.astype(helper.tensor_dtype_to_np_dtype(int(node.attr("to"))))


def _gather(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x, idx = inputs[0], inputs[1]
    assert x is not None and idx is not None
    return np.take(x, idx.astype(np.int64), axis=int(node.attr("axis", 0)))


def _slice(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    x = inputs[0]
    assert x is not None

    def ints(attr: str, i: int) -> list[int] | None:
        if attr in node.attrs:
            return [int(v) for v in node.attr(attr)]
        v = inputs[i] if i < len(inputs) else None
        return None if v is None else [int(t) for t in v.reshape(-1)]

    starts, ends = ints("starts", 1), ints("ends", 2)
    assert starts is not None and ends is not None
    axes = ints("axes", 3) or list(range(len(starts)))
    steps = ints("steps", 4) or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
        index[a % x.ndim] = slice(b, e, st)
    return x[tuple(index)]


def _concat(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    parts = [v for v in inputs if v is not None]
    return np.concatenate(parts, axis=int(node.attr("axis", 0)))


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Fold:
    def fold(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        a, b = inputs[0], inputs[1]
        assert a is not None and b is not None
        return np.asarray(fn(a, b)).astype(np.result_type(a, b))

    return fold


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Fold:
    def fold(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        x = inputs[0]
        assert x is not None
        return np.asarray(fn(x)).astype(x.dtype)

    return fold


def _variadic(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Fold:
    def fold(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        values = [v for v in inputs if v is not None]
        result = values[0]
        for v in values[1:]:
            result = np.asarray(fn(result, v)).astype(np.result_type(result, v))
        return result

    return fold


def _compare(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Fold:
    def fold(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        a, b = inputs[0], inputs[1]
        assert a is not None and b is not None
        return np.asarray(fn(a, b), dtype=bool)

    return fold


def _mod(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    fn = np.fmod if node.attr("fmod", 0) else np.mod  # fmod=0: the divisor's sign, like np.mod
    return np.asarray(fn(a, b)).astype(np.result_type(a, b))


def _where(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    c, a, b = inputs[0], inputs[1], inputs[2]
    assert c is not None and a is not None and b is not None
    return np.where(c.astype(bool), a, b).astype(np.result_type(a, b))


def _reduce(fn: Callable[..., np.ndarray]) -> Fold:
    def fold(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
        x = inputs[0]
        assert x is not None
        axes = _axes(node, inputs, max(x.ndim, 1))
        if not axes and node.attr("noop_with_empty_axes", 0):
            return x
        keep = bool(node.attr("keepdims", 1))
        return np.asarray(fn(x, axis=tuple(axes) or None, keepdims=keep)).astype(x.dtype)

    return fold


def _range(node: Node, inputs: Sequence[np.ndarray | None]) -> np.ndarray:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    assert start is not None and limit is not None and delta is not None
    return np.arange(start.item(), limit.item(), delta.item()).astype(start.dtype)


def source_axis(node: Node, axis: int, rank: int) -> int | None:
    """The axis of a folded node's first input that its output's ``axis`` is, when the fold only
    moves or re-types values (``Transpose``, ``Cast``); None for any other fold. Lets a spec name
    the stored weight a framework trains rather than its folded view (torch's ``Linear`` on 3-D
    inputs exports ``MatMul(x, Transpose(weight))``). Not ``Identity``: exporters write one
    parameter equal to another as ``Identity`` of it, and the two are trained apart."""
    if node.op_type == "Cast":
        return axis
    if node.op_type == "Transpose":
        perm = node.attr("perm")
        return int(perm[axis]) if perm is not None else rank - 1 - axis
    return None


FOLDS: dict[str, Fold] = {
    "Identity": _unary(lambda x: x),
    "Cast": _cast,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Neg": _unary(np.negative),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Abs": _unary(np.abs),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(np.divide),
    "Ceil": _unary(np.ceil),
    "Floor": _unary(np.floor),
    "Round": _unary(np.round),  # half to even, as ONNX
    "Relu": _unary(lambda x: np.maximum(x, 0)),
    "Not": _unary(np.logical_not),
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Mod": _mod,
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "LessOrEqual": _compare(np.less_equal),
    "Greater": _compare(np.greater),
    "GreaterOrEqual": _compare(np.greater_equal),
    "And": _compare(np.logical_and),
    "Or": _compare(np.logical_or),
    "Where": _where,
    "ReduceProd": _reduce(np.prod),
    "ReduceSum": _reduce(np.sum),
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
    "Range": _range,
}
"""Ops folded when every input is constant: shape views, the arithmetic of BN decompositions, and
the ops exporters use to compute Reshape targets, pads and sizes from ``Shape`` (TF "same" padding:
Cast to float, Div, Ceil, Max; keras ``Tensordot``: ReduceProd)."""


def constant_of_shape(node: Node, shape: Shape) -> np.ndarray:
    """The value of a ``ConstantOfShape`` node: its ``value`` attribute (float32 0 when absent,
    as ONNX specifies) repeated to ``shape``."""
    fill = node.attr("value")
    value = numpy_helper.to_array(fill).reshape(-1) if fill is not None else np.zeros(1, np.float32)
    return np.full(shape, value[0], dtype=value.dtype)
