"""A hypothesis strategy for small random CNN ONNX models built from the op kinds morphonnx prunes.

``cnn_graphs()`` draws the *structure* (which blocks, widths, kernels, strides, attribute vs input
forms, opset) with hypothesis and fills the weights from a drawn seed: He-normal conv / Gemm
weights, distinct BatchNormalization statistics (variance > 0), so a wrongly sliced channel changes
values. Graphs stay tiny (input 1x3x8x8 or 1x4x8x8, 2..12 channels per conv) so one example runs in
well under a second.

The model's ``doc_string`` lists the blocks, for ``hypothesis.note`` on failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["cnn_graphs", "MAX_CHANNELS"]

MAX_CHANNELS = 12
"""Widest conv output; concatenations may reach a little more."""

BLOCKS = (
    "conv",
    "depthwise",
    "grouped",
    "norm_act",
    "residual",
    "concat",
    "split",
    "slice",
    "se",
    "pool",
    "scale",
    "nhwc",
    "tap",
)
HEADS = ("gap_gemm", "flatten_gemm", "reshape_gemm", "matmul", "none")


@dataclass(frozen=True)
class T:
    """An NCHW activation of the graph being built."""

    name: str
    c: int
    h: int
    w: int


class Net:
    """Collects nodes and initializers; every tensor and node gets a fresh, unique name.

    Constants are initializers, or (``constant_nodes``) sometimes ``Constant`` nodes, or
    (``folded``) per-channel constants computed from a 1-D initializer by ``Unsqueeze`` /
    ``Reshape``, as exporters write them.
    """

    def __init__(
        self, draw: st.DrawFn, opset: int, seed: int, constant_nodes: bool, folded: bool
    ) -> None:
        self.draw = draw
        self.constant_nodes = constant_nodes
        self.folded = folded
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.extra_outputs: list[str] = []
        self.log: list[str] = []
        self._n = 0

    def fresh(self, kind: str) -> str:
        self._n += 1
        return f"{kind}_{self._n}"

    def const(self, kind: str, value: np.ndarray, *, per_channel: bool = False) -> str:
        """A constant tensor; ``per_channel``: one non-1 dim, so it may be folded from 1-D."""
        modes = ["init"]
        if self.constant_nodes:
            modes.append("node")
        if self.folded and per_channel:
            modes += ["reshape", "unsqueeze"] if value.ndim > 1 else ["reshape"]
        mode = self.draw(st.sampled_from(modes)) if len(modes) > 1 else "init"
        value = np.ascontiguousarray(value)
        if mode == "init":
            name = self.fresh(kind)
            self.inits.append(numpy_helper.from_array(value, name))
            return name
        if mode == "node":
            return self.op1("Constant", [], value=numpy_helper.from_array(value, self.fresh(kind)))
        self.log.append(f"{mode}{value.shape}")
        if mode == "reshape":  # from 1-D, or to 1-D from a row
            source = value.reshape(-1) if value.ndim > 1 else value.reshape(1, -1)
            flat = self.const(f"{kind}_src", source)
            return self.op1("Reshape", [flat, self.ints("folded_shape", list(value.shape))])
        flat = self.const(f"{kind}_1d", value.reshape(-1))
        c_axis = int(np.argmax(value.shape))
        axes = [i for i in range(value.ndim) if i != c_axis]
        if self.opset >= 13:
            return self.op1("Unsqueeze", [flat, self.ints("folded_axes", axes)])
        return self.op1("Unsqueeze", [flat], axes=axes)

    def ints(self, kind: str, values: list[int]) -> str:
        return self.const(kind, np.array(values, dtype=np.int64))

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)

    def small(self, shape: tuple[int, ...], scale: float = 0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def positive(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.uniform(0.5, 1.5, shape).astype(np.float32)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        outs = [self.fresh(f"{op_type.lower()}_out") for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), **attrs)
        )
        return outs

    def op1(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        return self.op(op_type, inputs, **attrs)[0]


# --- layers ------------------------------------------------------------------------------------


def conv(
    draw: st.DrawFn,
    net: Net,
    x: T,
    cout: int | None = None,
    *,
    k: int | None = None,
    stride: int | None = None,
    group: int = 1,
) -> T:
    if cout is None:
        cout = draw(st.integers(2, MAX_CHANNELS))
    if k is None:
        k = draw(st.sampled_from([1, 3]))
    if stride is None:
        stride = draw(st.sampled_from([1, 2])) if min(x.h, x.w) >= 2 else 1
    pad = k // 2
    cin_g = x.c // group
    w = net.const("conv_w", net.he((cout, cin_g, k, k), cin_g * k * k))
    inputs = [x.name, w]
    if draw(st.booleans()):
        inputs.append(net.const("conv_b", net.small((cout,)), per_channel=cout > 1))
    y = net.op1(
        "Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group
    )
    net.log.append(f"conv({x.c}->{cout}, k{k}, s{stride}, g{group}, bias={len(inputs) == 3})")
    return T(y, cout, (x.h + 2 * pad - k) // stride + 1, (x.w + 2 * pad - k) // stride + 1)


def batch_norm(net: Net, x: T) -> T:
    many = x.c > 1
    params = [
        net.const("bn_scale", net.positive((x.c,)), per_channel=many),
        net.const("bn_bias", net.small((x.c,)), per_channel=many),
        net.const("bn_mean", net.small((x.c,)), per_channel=many),
        net.const("bn_var", net.positive((x.c,)), per_channel=many),
    ]
    net.log.append("bn")
    return T(net.op1("BatchNormalization", [x.name, *params], epsilon=1e-5), x.c, x.h, x.w)


def activation(draw: st.DrawFn, net: Net, x: T) -> T:
    kind = draw(st.sampled_from(["Relu", "Sigmoid", "Clip"]))
    net.log.append(kind.lower())
    if kind == "Clip":
        lo = net.const("clip_min", np.array(0.0, dtype=np.float32))
        hi = net.const("clip_max", np.array(6.0, dtype=np.float32))
        return T(net.op1("Clip", [x.name, lo, hi]), x.c, x.h, x.w)
    return T(net.op1(kind, [x.name]), x.c, x.h, x.w)


def maybe_norm_act(draw: st.DrawFn, net: Net, x: T) -> T:
    if draw(st.booleans()):
        x = batch_norm(net, x)
    if draw(st.booleans()):
        x = activation(draw, net, x)
    return x


# --- blocks ------------------------------------------------------------------------------------


def block_conv(draw: st.DrawFn, net: Net, x: T) -> T:
    return maybe_norm_act(draw, net, conv(draw, net, x))


def block_depthwise(draw: st.DrawFn, net: Net, x: T) -> T:
    mult = draw(st.sampled_from([1, 2])) if 2 * x.c <= MAX_CHANNELS else 1
    y = conv(draw, net, x, x.c * mult, k=3, group=x.c)
    return maybe_norm_act(draw, net, y)


def block_grouped(draw: st.DrawFn, net: Net, x: T) -> T:
    options = [g for g in (2, 4) if x.c % g == 0]
    if not options:
        return block_conv(draw, net, x)
    g = draw(st.sampled_from(options))
    cout = g * draw(st.integers(1, MAX_CHANNELS // g))
    return maybe_norm_act(draw, net, conv(draw, net, x, cout, group=g))


def block_norm_act(draw: st.DrawFn, net: Net, x: T) -> T:
    x = batch_norm(net, x)
    return activation(draw, net, x)


def block_residual(draw: st.DrawFn, net: Net, x: T) -> T:
    """``f(x) + x`` (identity) or ``f(x) + proj(x)`` (projection, possibly strided)."""
    projection = draw(st.booleans())
    stride = draw(st.sampled_from([1, 2])) if projection and min(x.h, x.w) >= 2 else 1
    c = draw(st.integers(2, MAX_CHANNELS)) if projection else x.c
    net.log.append(f"residual(projection={projection}, stride={stride})[")
    f = conv(draw, net, x, c, stride=stride)
    f = maybe_norm_act(draw, net, f)
    if draw(st.booleans()):
        f = maybe_norm_act(draw, net, conv(draw, net, f, c, stride=1))
    other = conv(draw, net, x, c, k=1, stride=stride) if projection else x
    a, b = (f, other) if draw(st.booleans()) else (other, f)
    net.log.append("]add")
    y = T(net.op1("Add", [a.name, b.name]), c, f.h, f.w)
    return activation(draw, net, y) if draw(st.booleans()) else y


def block_concat(draw: st.DrawFn, net: Net, x: T) -> T:
    n = draw(st.integers(2, 3))
    branches: list[T] = []
    net.log.append(f"concat{n}[")
    for i in range(n):
        kind = draw(st.sampled_from(["conv", "identity", "pool"] if i < n - 1 else ["conv"]))
        if kind == "identity" and all(b.name != x.name for b in branches):
            branches.append(x)
            net.log.append("identity")
        elif kind == "pool":
            y = net.op1("MaxPool", [x.name], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
            branches.append(T(y, x.c, x.h, x.w))
            net.log.append("maxpool3")
        else:
            y = conv(draw, net, x, draw(st.integers(2, 4)), stride=1)
            branches.append(maybe_norm_act(draw, net, y))
    branches = draw(st.permutations(branches))
    axis = draw(st.sampled_from([1, -3]))
    net.log.append(f"]axis={axis}")
    y = net.op1("Concat", [b.name for b in branches], axis=axis)
    return T(y, sum(b.c for b in branches), x.h, x.w)


def block_split(draw: st.DrawFn, net: Net, x: T) -> T:
    if x.c < 2:
        return block_conv(draw, net, x)
    n = draw(st.integers(2, min(3, x.c)))
    cuts = sorted(draw(st.sets(st.integers(1, x.c - 1), min_size=n - 1, max_size=n - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, x.c], strict=True)]
    equal = x.c % n == 0 and draw(st.booleans())
    if equal:
        sizes = [x.c // n] * n
    inputs = [x.name]
    attrs: dict[str, object] = {"axis": draw(st.sampled_from([1, -3]))}
    if not equal:
        if net.opset >= 13:
            inputs.append(net.ints("split_sizes", sizes))
        else:
            attrs["split"] = sizes
    net.log.append(f"split{sizes} equal={equal} attrs={attrs}[")
    parts = [
        T(p, c, x.h, x.w) for p, c in zip(net.op("Split", inputs, n, **attrs), sizes, strict=True)
    ]
    outs: list[T] = []
    for p in parts:
        kind = draw(st.sampled_from(["conv", "identity", "act", "unused"]))
        net.log.append(kind)
        if kind == "conv":
            outs.append(conv(draw, net, p, draw(st.integers(2, 6)), stride=1))
        elif kind == "act":
            outs.append(activation(draw, net, p))
        elif kind == "identity" or not outs and p is parts[-1]:
            outs.append(p)
    if len(outs) == 1:
        net.log.append("]")
        return outs[0]
    outs = draw(st.permutations(outs))
    net.log.append("]concat")
    return T(net.op1("Concat", [o.name for o in outs], axis=1), sum(o.c for o in outs), x.h, x.w)


def block_slice(draw: st.DrawFn, net: Net, x: T) -> T:
    if x.c < 2:
        return block_conv(draw, net, x)
    start = draw(st.integers(0, x.c - 1))
    end = draw(st.integers(start + 1, x.c))
    c = end - start
    big = 2**62
    form = draw(st.sampled_from(["axes", "negative", "two_axes", "no_axes", "steps", "step2"]))
    h = x.h
    if form == "step2":  # a step on the channel axis: the channels are stopped, not pruned
        steps = [2]
        starts, ends, axes = [start], [end], [1]
        c = len(range(start, end, 2))
    else:
        steps = [1] if form == "steps" else None
        if form == "negative":
            starts, ends, axes = [start - x.c], [end - x.c if end < x.c else big], [-3]
        elif form == "two_axes":
            h = draw(st.integers(1, x.h))
            starts, ends, axes = [0, start], [h, end], [2, 1]
        else:
            starts, ends, axes = [start], [end], [1]
        if form == "no_axes":
            starts, ends, axes = [0, start], [big, end], []
    inputs = [x.name, net.ints("starts", starts), net.ints("ends", ends)]
    if axes:
        inputs.append(net.ints("axes", axes))
    if steps:
        inputs.append(net.ints("steps", steps))
    net.log.append(f"slice({form}, {start}:{end} of {x.c})")
    return T(net.op1("Slice", inputs), c, h, x.w)


def block_se(draw: st.DrawFn, net: Net, x: T) -> T:
    r = draw(st.integers(1, max(1, x.c // 2)))
    net.log.append(f"se(r={r})[")
    pooled = T(net.op1("GlobalAveragePool", [x.name]), x.c, 1, 1)
    s = conv(draw, net, pooled, r, k=1, stride=1)
    s = T(net.op1("Relu", [s.name]), r, 1, 1)
    s = conv(draw, net, s, x.c, k=1, stride=1)
    s = T(net.op1("Sigmoid", [s.name]), x.c, 1, 1)
    net.log.append("]mul")
    a, b = (x.name, s.name) if draw(st.booleans()) else (s.name, x.name)
    return T(net.op1("Mul", [a, b]), x.c, x.h, x.w)


def block_pool(draw: st.DrawFn, net: Net, x: T) -> T:
    kind = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    if min(x.h, x.w) >= 2 and draw(st.booleans()):
        net.log.append(f"{kind}2s2")
        return T(
            net.op1(kind, [x.name], kernel_shape=[2, 2], strides=[2, 2]), x.c, x.h // 2, x.w // 2
        )
    net.log.append(f"{kind}3s1")
    y = net.op1(kind, [x.name], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return T(y, x.c, x.h, x.w)


def block_scale(draw: st.DrawFn, net: Net, x: T) -> T:
    shape = draw(st.sampled_from([(1, x.c, 1, 1), (x.c, 1, 1)]))
    op = draw(st.sampled_from(["Mul", "Add"]))
    value = net.positive(shape) if op == "Mul" else net.small(shape, 0.5)
    k = net.const("per_channel", value, per_channel=x.c > 1)
    net.log.append(f"{op}{shape}")
    a, b = (x.name, k) if draw(st.booleans()) else (k, x.name)
    return T(net.op1(op, [a, b]), x.c, x.h, x.w)


def block_nhwc(draw: st.DrawFn, net: Net, x: T) -> T:
    """To NHWC, something per channel on the last axis, and back."""
    y = net.op1("Transpose", [x.name], perm=[0, 2, 3, 1])
    kind = draw(st.sampled_from(["mul", "relu", "matmul"]))
    c = x.c
    if kind == "mul":
        y = net.op1("Mul", [y, net.const("nhwc_scale", net.positive((x.c,)))])
    elif kind == "relu":
        y = net.op1("Relu", [y])
    else:
        c = draw(st.integers(2, MAX_CHANNELS))
        y = net.op1("MatMul", [y, net.const("nhwc_w", net.he((x.c, c), x.c))])
        y = net.op1("Add", [y, net.const("nhwc_b", net.small((c,)))])
    net.log.append(f"nhwc[{kind}]")
    return T(net.op1("Transpose", [y], perm=[0, 3, 1, 2]), c, x.h, x.w)


def block_tap(draw: st.DrawFn, net: Net, x: T) -> T:
    """Make the current tensor a second graph output (its channels may not be pruned)."""
    net.extra_outputs.append(x.name)
    net.log.append("tap")
    return block_conv(draw, net, x)


BLOCK_FNS = {name: globals()[f"block_{name}"] for name in BLOCKS}


# --- heads -------------------------------------------------------------------------------------


def gemm(draw: st.DrawFn, net: Net, x: str, k: int, f: int) -> str:
    trans_b = draw(st.booleans())
    w = net.he((f, k) if trans_b else (k, f), k)
    inputs = [x, net.const("fc_w", w)]
    bias = draw(st.sampled_from([None, (f,), (1, f)]))
    if bias is not None:
        inputs.append(net.const("fc_b", net.small(bias)))
    net.log.append(f"gemm({k}->{f}, transB={int(trans_b)}, bias={bias})")
    return net.op1("Gemm", inputs, transB=int(trans_b))


def head(draw: st.DrawFn, net: Net, x: T) -> str:
    kind = draw(st.sampled_from(HEADS))
    net.log.append(f"head={kind}")
    if kind == "none":
        return x.name
    if kind == "matmul":  # a Linear layer as MatMul + Add after GlobalAveragePool + Flatten
        flat = net.op1("Flatten", [net.op1("GlobalAveragePool", [x.name])], axis=1)
        f = draw(st.integers(2, 10))
        y = net.op1("MatMul", [flat, net.const("lin_w", net.he((x.c, f), x.c))])
        return net.op1("Add", [y, net.const("lin_b", net.small((f,)))])
    if kind == "gap_gemm":
        flat = net.op1("Flatten", [net.op1("GlobalAveragePool", [x.name])], axis=1)
        k = x.c
    elif kind == "flatten_gemm":
        flat = net.op1("Flatten", [x.name], axis=1)
        k = x.c * x.h * x.w
    else:
        k = x.c * x.h * x.w
        target = draw(st.sampled_from([[1, -1], [1, k], [0, -1], [-1, k]]))
        net.log.append(f"reshape{target}")
        flat = net.op1("Reshape", [x.name, net.ints("shape", target)])
    if draw(st.booleans()):  # hidden fully-connected layer: a prunable group of features
        hidden = draw(st.integers(2, 10))
        y = gemm(draw, net, flat, k, hidden)
        y = net.op1("Relu", [y])
        return gemm(draw, net, y, hidden, draw(st.integers(2, 10)))
    return gemm(draw, net, flat, k, draw(st.integers(2, 10)))


@st.composite
def cnn_graphs(
    draw: st.DrawFn,
    min_blocks: int = 3,
    max_blocks: int = 7,
    *,
    constant_nodes: bool = True,
    folded: bool = False,
) -> onnx.ModelProto:
    """A random valid CNN (ModelProto, opset 11, 13 or 17) with one float input ``input``.

    ``constant_nodes``: some constants are ``Constant`` nodes; ``folded``: some per-channel
    constants are computed by ``Unsqueeze`` / ``Reshape`` from a 1-D initializer.
    """
    opset = draw(st.sampled_from([11, 13, 17]))
    seed = draw(st.integers(0, 2**32 - 1))
    net = Net(draw, opset, seed, constant_nodes, folded)
    cin = draw(st.sampled_from([3, 4]))
    x = T("input", cin, 8, 8)
    net.log.append(f"opset {opset}, input 1x{cin}x8x8, seed {seed}")
    x = block_conv(draw, net, x)
    kinds = st.lists(st.sampled_from(BLOCKS), min_size=min_blocks - 1, max_size=max_blocks - 1)
    for kind in draw(kinds):
        x = BLOCK_FNS[kind](draw, net, x)
    y = head(draw, net, x)
    outputs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)]
    outputs += [
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in net.extra_outputs
    ]
    graph = helper.make_graph(
        net.nodes,
        "random_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, 8, 8])],
        outputs,
        initializer=net.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=8,
        producer_name="hypothesis",
    )
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    if draw(st.booleans()):  # stale intermediate shapes the rewrite has to drop
        model.graph.value_info.extend(inferred.graph.value_info)
    model.doc_string = "; ".join(net.log)
    onnx.checker.check_model(model, full_check=True)
    return model
