"""The channel-rule table: one entry per ONNX op kind, and nothing about ops anywhere else.

Each rule reads one node and says how the channels of its outputs relate to its inputs and weights
(``RuleContext.same`` / ``tie``), which weights have a slice per channel (``weight``), and where
channels may not cross (``stop_all``, ``stop``). An op missing from :data:`RULES` stops every group
it touches: nothing unknown is assumed to pass channels through.

Each entry may also carry a *rewrite*: how the node's attributes or constant inputs change when
channels are removed (``group`` of depthwise convs, Reshape targets, Split sizes, Slice bounds).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from morphonnx.blocks import (
    choose_split,
    constant_target,
    group_norm,
    matmul_activations,
    split_reshape,
    weight_chain,
)
from morphonnx.channels import Channels, RuleContext, Slot

ChannelRule = Callable[[RuleContext], None]


@dataclass(frozen=True)
class Rule:
    channels: ChannelRule
    rewrite: str | None = None  # name of the rewrite in morphonnx.prune.REWRITES
    # the rule reads no shapes (it only stops or names no channels), so it runs even where shape
    # inference failed: the user then reads the op's own reason, not "shape unknown"
    shapeless: bool = False


# --- small helpers ---------------------------------------------------------------------------


def _ints(
    ctx: RuleContext, attr: str, input_index: int, computed: bool = False
) -> list[int] | None:
    """An int list given as attribute (old opsets) or constant input (new opsets); with
    ``computed``, also an input computed from channel counts only (``RuleContext.bound``)."""
    raw = ctx.node.attr(attr)
    if raw is None and ctx.input(input_index):
        t = ctx.input(input_index)
        v = ctx.bound(t) if computed else ctx.value(t)
        if v is None:
            return None
        raw = v.reshape(-1).tolist()
    return None if raw is None else [int(x) for x in raw]


def _passthrough(
    ctx: RuleContext, a: int, outputs: list[str] | None = None, b: int | None = None
) -> None:
    """Outputs keep the channels of input 0 (axis ``a``) on axis ``b`` (default: the same)."""
    src = ctx.ch.by_key[(ctx.input(0), a)]
    b = a if b is None else b
    for t in ctx.outputs if outputs is None else outputs:
        if not t or ctx.graph.shape(t) is None:
            continue
        if len(ctx.shape(t)) <= b or ctx.shape(t)[b] != src.size:
            _mixes(ctx, f"changes the channel count of `{ctx.input(0)}`")
            return
        ctx.same(src, ctx.out(t, b))


def _mixes(ctx: RuleContext, what: str) -> None:
    ctx.stop_all(f"{ctx.node.op_type} at {ctx.where()} {what}")


def follows_input(rule: Callable[[RuleContext, str, int], None]) -> ChannelRule:
    """For rules about the channels of input 0 (``x``, channel axis ``a``): when ``x`` carries no
    channels, neither do the outputs, for the same reason."""

    @functools.wraps(rule)
    def wrapped(ctx: RuleContext) -> None:
        x = ctx.input(0)
        a = ctx.axis(x)
        if a is None:
            ctx.no_channels(ctx.inherit_why())
            return
        rule(ctx, x, a)

    return wrapped


# --- rules -----------------------------------------------------------------------------------


@follows_input
def unary(ctx: RuleContext, x: str, a: int) -> None:
    """Element-wise on one activation (activations, Cast, Identity, Dropout, Clip, ...)."""
    _passthrough(ctx, a)


@follows_input
def channel_first(ctx: RuleContext, x: str, a: int) -> None:
    """Ops that treat axis 1 as channels and act per channel (pooling)."""
    if a != 1:
        _mixes(ctx, f"pools over axis {a}, where the channels of `{x}` are")
        return
    _passthrough(ctx, 1)


def normalization(ctx: RuleContext) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    x = ctx.input(0)
    if ctx.axis(x) not in (None, 1):
        _mixes(ctx, "normalizes axis 1, not the channel axis")
        return
    if ctx.axis(x) is None and not any(ctx.is_const(t) for t in ctx.inputs[1:]):
        ctx.no_channels(ctx.inherit_why())
        return
    src = ctx.channels_of(x, 1)
    y = ctx.out(ctx.outputs[0], 1)
    ctx.same(src, y)
    roles = ["gamma", "beta", "stat", "stat"]
    for t, role in zip(ctx.inputs[1:], roles, strict=False):
        if t and ctx.is_const(t) and ctx.rank(t) == 1 and ctx.shape(t)[0] == src.size:
            ctx.same(src, ctx.weight(t, 0, role))
        elif t:
            ctx.stop(src, f"{ctx.node.op_type} at {ctx.where()} has a non-constant parameter `{t}`")


def elementwise(ctx: RuleContext) -> None:
    """Broadcasting ops between tensors (Add, Mul, Where, ...): channels on the same aligned axis
    are tied; a size-1 (broadcast) dim ties nothing; a constant with a slice per channel is a
    member of the group."""
    out = ctx.outputs[0]
    rank = ctx.rank(out)
    inputs = [t for t in ctx.inputs if t]
    axis = None
    for t in inputs:
        a = ctx.axis(t)
        if a is not None and ctx.shape(t)[a] > 1:
            axis = a + rank - ctx.rank(t)
            break
    if axis is None:
        for t in inputs:
            a = ctx.axis(t)
            if a is not None:
                axis = a + rank - ctx.rank(t)
                break
    if axis is None:
        ctx.no_channels(ctx.inherit_why())
        return
    size = ctx.shape(out)[axis]
    y = ctx.out(out, axis)
    role = {"Add": "bias", "Sub": "bias", "Mul": "scale", "Div": "scale"}.get(
        ctx.node.op_type, "const"
    )
    for t in inputs:
        local = axis - (rank - ctx.rank(t))
        own = ctx.axis(t)
        dim = ctx.shape(t)[local] if local >= 0 else 1
        if own is not None and own != local and ctx.shape(t)[own] > 1:
            ctx.stop(
                ctx.ch.by_key[(t, own)],
                f"{ctx.node.op_type} at {ctx.where()} broadcasts the channels of `{t}` "
                f"(axis {own}) onto axis {own + rank - ctx.rank(t)} of `{out}`",
            )
            ctx.stop(y, f"channel axes of the inputs of {ctx.node.op_type} at {ctx.where()} differ")
        if local < 0 or (dim == 1 and size != 1):
            continue  # broadcast along the channel axis: ties nothing
        if ctx.is_const(t):
            ctx.same(y, ctx.weight(t, local, role))
        else:
            ctx.same(y, ctx.channels_of(t, local))


def conv(ctx: RuleContext) -> None:
    """Conv: output channels are the weight's filters (axis 0); input channels meet the weight's
    axis 1. Depthwise: input channel i feeds outputs i*m..i*m+m-1. Grouped: channel p of every
    group is tied, so groups keep equal sizes."""
    x, w, b = ctx.input(0), ctx.input(1), ctx.input(2)
    chain = None if ctx.is_const(w) else weight_chain(ctx, w)
    if not ctx.is_const(w) and chain is None:
        _mixes(ctx, f"takes its weights `{w}` from a computed tensor")
        return
    g = int(ctx.node.attr("group", 1))
    cout, cin_g = ctx.shape(w)[0], ctx.shape(w)[1]
    y = ctx.out(ctx.outputs[0], 1)
    if b:
        ctx.same(y, ctx.weight(b, 0, "bias"))
    xs = ctx.channels_of(x, 1)
    if chain is not None:  # computed filter by filter (weight standardization)
        tensors, consts, over_inputs = chain
        for t in tensors:
            ctx.same(y, ctx.out(t, 0))
        for t in consts:
            ctx.same(y, ctx.weight(t, 0, "producer" if ctx.shape(t) == ctx.shape(w) else "scale"))
        if cin_g > 1:
            how = "with statistics over its input channels" if over_inputs else "at run time"
            ctx.stop(xs, f"Conv at {ctx.where()} computes its weights `{w}` {how}")
        if g > 1:
            _group_ties(ctx, xs, y, g, cin_g, cout // g, None)
        return
    ctx.same(y, ctx.weight(w, 0, "producer"))
    # a plain conv reads every input channel through axis 1 (size 1 for a one-channel input);
    # a depthwise one has nothing per input channel there
    consumer = ctx.weight(w, 1, "consumer") if g == 1 or cin_g > 1 else None
    _group_ties(ctx, xs, y, g, cin_g, cout // g, consumer)


def conv_transpose(ctx: RuleContext) -> None:
    """ConvTranspose: weight is (C_in, C_out/group, k...); axis 0 meets the input, axis 1 the
    output."""
    x, w, b = ctx.input(0), ctx.input(1), ctx.input(2)
    if not ctx.is_const(w):
        _mixes(ctx, f"takes its weights `{w}` from a computed tensor")
        return
    g = int(ctx.node.attr("group", 1))
    cin, cout_g = ctx.shape(w)[0], ctx.shape(w)[1]
    y = ctx.out(ctx.outputs[0], 1)
    if b:
        ctx.same(y, ctx.weight(b, 0, "bias"))
    xs = ctx.channels_of(x, 1)
    ctx.same(xs, ctx.weight(w, 0, "consumer"))
    cin_g = cin // g
    if g > 1 and cin_g == 1:  # depthwise transpose: output block of input i is i*m .. i*m+m-1
        ctx.tie(xs, np.arange(cin)[:, None], y, np.arange(cin * cout_g).reshape(cin, cout_g))
        if cout_g > 1:
            ctx.stop(ctx.weight(w, 1, "producer"), f"depthwise ConvTranspose at {ctx.where()}")
        return
    wp = ctx.weight(w, 1, "producer")
    q = np.arange(cout_g)
    ctx.tie(y, np.arange(g)[:, None] * cout_g + q[None, :], wp, q[None, :])
    ctx.tie(
        xs, np.arange(g)[:, None] * cin_g + np.arange(cin_g)[None, :], xs, np.arange(cin_g)[None, :]
    )


def _group_ties(
    ctx: RuleContext, xs: Slot, y: Slot, g: int, cin_g: int, cout_g: int, consumer: Slot | None
) -> None:
    if g == 1:
        assert consumer is not None
        ctx.same(xs, consumer)
        return
    if cin_g == 1:  # depthwise (channel multiplier cout_g)
        ctx.tie(xs, np.arange(g)[:, None], y, np.arange(g * cout_g).reshape(g, cout_g))
        return
    p = np.arange(cin_g)
    ctx.tie(xs, np.arange(g)[:, None] * cin_g + p[None, :], xs, p[None, :])
    if consumer is not None:
        ctx.tie(xs, p, consumer, p)
    q = np.arange(cout_g)
    ctx.tie(y, np.arange(g)[:, None] * cout_g + q[None, :], y, q[None, :])


def gemm(ctx: RuleContext) -> None:
    """Gemm: Y = A' B' + C. With constant B, output features are B's columns (rows if transB)."""
    a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
    ta, tb = int(ctx.node.attr("transA", 0)), int(ctx.node.attr("transB", 0))
    if not ctx.is_const(b) or ctx.is_const(a):
        _mixes(ctx, "multiplies two computed tensors")
        return
    y = ctx.out(ctx.outputs[0], 1)
    ctx.same(y, ctx.weight(b, 0 if tb else 1, "producer"))
    ctx.same(ctx.channels_of(a, 0 if ta else 1), ctx.weight(b, 1 if tb else 0, "consumer"))
    if not c or ctx.rank(c) == 0 or ctx.shape(c)[-1] != y.size or y.size == 1:
        return  # no C, or C broadcast over the features
    if ctx.is_const(c):
        ctx.same(y, ctx.weight(c, -1, "bias"))
    else:  # a computed C is added feature by feature: its channels are the output's
        ctx.same(y, ctx.channels_of(c, ctx.rank(c) - 1))


def matmul(ctx: RuleContext) -> None:
    """MatMul with a constant right operand is a source on the last axis (a Linear layer); between
    two computed tensors (attention) it mixes channels."""
    a, b = ctx.input(0), ctx.input(1)
    if not ctx.is_const(a) and not ctx.is_const(b):
        matmul_activations(ctx)
        return
    if ctx.is_const(a) or ctx.rank(b) < 2 or ctx.rank(a) < 2:
        _mixes(ctx, "multiplies computed tensors (channels mix)")
        return
    out = ctx.outputs[0]
    own = ctx.axis(a)
    ra = ctx.rank(a)
    if own is not None and own != ra - 1:
        # channels ride along a batch / row axis; the new features of b are not followed
        _passthrough(ctx, own, [out], own + ctx.rank(out) - ra)
        ctx.stop(
            ctx.weight(b, -1, "producer"), f"MatMul at {ctx.where()} is not on the channel axis"
        )
        return
    y = ctx.out(out, ctx.rank(out) - 1)
    ctx.same(y, ctx.weight(b, -1, "producer"))
    ctx.same(ctx.channels_of(a, ra - 1), ctx.weight(b, -2, "consumer"))


def reshape_map(
    in_shape: tuple[int, ...], a: int, out_shape: tuple[int, ...]
) -> tuple[int, np.ndarray] | None:
    """Where channel axis ``a`` lands when data keeps its order but changes shape.

    Returns the output axis and, per channel, the indices it owns there (a block after a Flatten,
    a stride after an NHWC flatten), or None when the channel axis is split across several axes.
    """
    c = in_shape[a]
    outer = math.prod(in_shape[:a])
    inner = math.prod(in_shape[a + 1 :])
    fits = []  # output axes b where outer x channel x inner splits as before(b) | o*c*i | after(b)
    for b, d in enumerate(out_shape):
        before, after = math.prod(out_shape[:b]), math.prod(out_shape[b + 1 :])
        if before and after and not outer % before and not inner % after:
            if d == (outer // before) * c * (inner // after):
                fits.append(b)
    if not fits:
        return None
    # with one channel several axes fit: prefer the same axis, then a real (non-1) axis
    b = a if a in fits else next((f for f in fits if out_shape[f] > 1), fits[0])
    o = outer // math.prod(out_shape[:b])
    i = inner // math.prod(out_shape[b + 1 :])
    pos = (
        np.arange(o)[None, :, None] * (c * i)
        + np.arange(c)[:, None, None] * i
        + np.arange(i)[None, None, :]
    ).reshape(c, o * i)
    return b, pos


@follows_input
def reshape(ctx: RuleContext, x: str, a: int) -> None:
    """Reshape / Flatten / Squeeze / Unsqueeze: follow the channel axis through the new shape."""
    out = ctx.outputs[0]
    found = reshape_map(ctx.shape(x), a, ctx.shape(out))
    if found is None:
        split = choose_split(ctx, x, a)
        if split is not None and split_reshape(ctx, x, a, split):
            return
        how = " by a target computed at run time" if split is not None else ""
        _mixes(ctx, f"splits the channel axis of `{x}` ({ctx.shape(x)} -> {ctx.shape(out)}){how}")
        return
    b, pos = found
    if ctx.node.op_type == "Reshape":  # a target from shapes that the rewrite must write
        constant_target(ctx, x, a, b)
    ctx.tie(ctx.ch.by_key[(x, a)], np.arange(pos.shape[0])[:, None], ctx.out(out, b), pos)


@follows_input
def transpose(ctx: RuleContext, x: str, a: int) -> None:
    perm = ctx.node.attr("perm") or list(reversed(range(ctx.rank(x))))
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], list(perm).index(a)))


def concat(ctx: RuleContext) -> None:
    """Concat along the channel axis: input i owns channels offset_i .. offset_i+C_i-1."""
    out = ctx.outputs[0]
    rank = ctx.rank(out)
    cat = int(ctx.node.attr("axis", 1)) % rank
    axes = [ctx.axis(t) for t in ctx.inputs if t]
    known = [a for a in axes if a is not None]
    if not known:
        ctx.no_channels(ctx.inherit_why())
        return
    if cat not in known:
        elementwise(ctx)
        return
    y = ctx.out(out, cat)
    offset = 0
    for t in ctx.inputs:
        if not t:
            continue
        n = ctx.shape(t)[cat]
        part = ctx.weight(t, cat, "const") if ctx.is_const(t) else ctx.channels_of(t, cat)
        ctx.tie(part, np.arange(n), y, offset + np.arange(n))
        offset += n


@follows_input
def split(ctx: RuleContext, x: str, a: int) -> None:
    """Split along the channel axis: output j owns input channels offset_j .. offset_j+C_j-1."""
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis != a:
        _passthrough(ctx, a)
        return
    src = ctx.ch.by_key[(x, a)]
    offset = 0
    for t in ctx.outputs:
        n = ctx.shape(t)[a]
        if t:
            ctx.tie(src, offset + np.arange(n), ctx.out(t, a), np.arange(n))
        offset += n


@follows_input
def slice_(ctx: RuleContext, x: str, a: int) -> None:
    """Slice: on the channel axis (step 1), output channel i is input channel start+i. Bounds
    computed from the channel count (torch ``chunk``) are read at the analyzed shapes; the
    rewrite writes them as constants, so a Slice that also cuts other axes must have constant
    bounds (theirs may follow batch or spatial dims at run time)."""
    rank = ctx.rank(x)
    attr_form = "starts" in ctx.node.attrs
    axes = _ints(ctx, "axes", 3)
    if ctx.input(3) and axes is None:
        _mixes(ctx, "slices axes computed at run time")
        return
    if axes is None:
        count = len(ctx.node.attr("starts")) if attr_form else ctx.shape(ctx.input(1))[0]
        axes = list(range(count))
    axes = [int(v) % rank for v in axes]
    if a not in axes:
        _passthrough(ctx, a)
        return
    k = axes.index(a)
    steps = _ints(ctx, "steps", 4)
    if (ctx.input(4) and steps is None) or (steps is not None and steps[k] != 1):
        _mixes(ctx, "slices the channel axis with a step other than 1 (or unknown)")
        return
    starts, ends = _ints(ctx, "starts", 1, True), _ints(ctx, "ends", 2, True)
    if not attr_form and len(axes) > 1:  # computed bounds become constants: only if alone
        if not (ctx.is_const(ctx.input(1)) and ctx.is_const(ctx.input(2))):
            starts = None
    if starts is None or ends is None:
        _mixes(ctx, "slices the channel axis with bounds computed at run time")
        return
    n_in = ctx.shape(x)[a]
    start = starts[k]
    start = max(0, min(n_in, start + n_in if start < 0 else start))
    n_out = ctx.shape(ctx.outputs[0])[a]
    ctx.tie(
        ctx.ch.by_key[(x, a)],
        start + np.arange(n_out),
        ctx.out(ctx.outputs[0], a),
        np.arange(n_out),
    )


@follows_input
def gather(ctx: RuleContext, x: str, a: int) -> None:
    """Gather off the channel axis passes channels on; on the channel axis it picks channels."""
    idx = ctx.input(1)
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis == a:
        _mixes(ctx, "gathers along the channel axis")
        return
    shift = ctx.rank(idx) - 1 if a > axis else 0
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], a + shift))


@follows_input
def pad(ctx: RuleContext, x: str, a: int) -> None:
    """Pad passes channels on unless it pads the channel axis (torch's ``F.pad`` computes the
    full pads vector from the list it is given: read like constants)."""
    pads = _ints(ctx, "pads", 1, True)
    rank = ctx.rank(x)
    axes = _ints(ctx, "axes", 3) if len(ctx.inputs) > 3 else None
    axes = [v % rank for v in axes] if axes else list(range(rank))
    if pads is None:
        _mixes(ctx, "pads by amounts computed at run time")
        return
    if a in axes:
        k = axes.index(a)
        if pads[k] or pads[k + len(axes)]:
            _mixes(ctx, "pads the channel axis")
            return
    _passthrough(ctx, a)


@follows_input
def resize(ctx: RuleContext, x: str, a: int) -> None:
    """Resize / Upsample pass channels on when the channel axis keeps its size."""
    out = ctx.outputs[0]
    if ctx.shape(out)[a] != ctx.shape(x)[a]:
        _mixes(ctx, "rescales the channel axis")
        return
    _passthrough(ctx, a)


@follows_input
def expand(ctx: RuleContext, x: str, a: int) -> None:
    """Expand / Tile: channels pass when the channel axis is not repeated."""
    out = ctx.outputs[0]
    b = a + ctx.rank(out) - ctx.rank(x)
    if ctx.shape(out)[b] != ctx.shape(x)[a]:
        _mixes(ctx, "repeats the channel axis")
        return
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(out, b))


@follows_input
def reduce(ctx: RuleContext, x: str, a: int) -> None:
    """Reductions over other axes (global pooling as ReduceMean) pass channels; over the channel
    axis they mix them."""
    rank = ctx.rank(x)
    axes = _ints(ctx, "axes", 1)
    if axes is None and ctx.input(1):
        _mixes(ctx, "reduces over axes computed at run time")
        return
    if not axes:
        if ctx.node.attr("noop_with_empty_axes", 0):
            _passthrough(ctx, a)
            return
        axes = list(range(rank))
    axes = [v % rank for v in axes]
    if a in axes:
        _mixes(ctx, "reduces over the channel axis (channels mix)")
        return
    keep = int(ctx.node.attr("keepdims", 1))
    b = a if keep else a - sum(1 for v in axes if v < a)
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], b))


@follows_input
def arg_reduce(ctx: RuleContext, x: str, a: int) -> None:
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis == a:
        _mixes(ctx, "reduces over the channel axis")
        return
    keep = int(ctx.node.attr("keepdims", 1))
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], a if keep or a < axis else a - 1))


@follows_input
def softmax(ctx: RuleContext, x: str, a: int) -> None:
    """Softmax-like ops mix the axes they normalize (from ``axis`` on, before opset 13)."""
    rank = ctx.rank(x)
    if ctx.graph.opset >= 13:
        axis = int(ctx.node.attr("axis", -1)) % rank
        mixed = a == axis
    else:
        axis = int(ctx.node.attr("axis", 1)) % rank
        mixed = a >= axis
    if mixed and ctx.shape(x)[a] > 1:
        _mixes(ctx, f"normalizes over the channel axis {a} (channels mix)")
        return
    _passthrough(ctx, a)


@follows_input
def layer_norm(ctx: RuleContext, x: str, a: int) -> None:
    """LayerNormalization mixes the axes from ``axis`` on; other axes pass."""
    if a >= int(ctx.node.attr("axis", -1)) % ctx.rank(x):
        _mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    _passthrough(ctx, a, ctx.outputs[:1])


@follows_input
def lp_norm(ctx: RuleContext, x: str, a: int) -> None:
    if int(ctx.node.attr("axis", -1)) % ctx.rank(x) == a:
        _mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    _passthrough(ctx, a)


@follows_input
def mvn(ctx: RuleContext, x: str, a: int) -> None:
    if a in [v % ctx.rank(x) for v in ctx.node.attr("axes", [0, 2, 3])]:
        _mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    _passthrough(ctx, a)


@follows_input
def quantize(ctx: RuleContext, x: str, a: int) -> None:
    """(De)QuantizeLinear: per-channel scale and zero point are members when on the channel axis."""
    src = ctx.ch.by_key[(x, a)]
    axis = int(ctx.node.attr("axis", 1)) % ctx.rank(x)
    for t in ctx.inputs[1:3]:
        if t and ctx.rank(t) == 1 and ctx.shape(t)[0] > 1:
            if axis != a or not ctx.is_const(t):
                _mixes(ctx, "quantizes per channel along another axis")
                return
            ctx.same(src, ctx.weight(t, 0, "const"))
    _passthrough(ctx, a)


def shape_only(ctx: RuleContext) -> None:
    """Shape / Size read only the shape, which pruning keeps consistent at run time."""
    ctx.no_channels(f"shape computation at {ctx.where()}")


def constant(ctx: RuleContext) -> None:
    """Constants carry no channels of their own; rules that consume them name the weight axes."""
    ctx.no_channels(f"constant from {ctx.where()}")


def mixing(what: str) -> ChannelRule:
    def rule(ctx: RuleContext) -> None:
        _mixes(ctx, what)

    return rule


def unsupported(ctx: RuleContext) -> None:
    domain = f"{ctx.node.domain}." if not ctx.node.standard else ""
    ctx.stop_all(f"unsupported op `{domain}{ctx.node.op_type}` at {ctx.where()}")


_UNARY = """Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign
Mish ThresholdedRelu Erf Exp Log Sqrt Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos
Atan Sinh Cosh Asinh Acosh Atanh IsNaN IsInf Not BitwiseNot Identity Cast CastLike Dropout Clip
Shrink Swish""".split()
_ELEMENTWISE = """Add Sub Mul Div Pow Max Min Sum Mean Where PRelu Mod Equal Less LessOrEqual
Greater GreaterOrEqual And Or Xor BitShift BitwiseAnd BitwiseOr BitwiseXor""".split()
_POOLS = """MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool""".split()
_REDUCE = """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare""".split()

RULES: dict[str, Rule] = {
    **{op: Rule(unary) for op in _UNARY},
    **{op: Rule(elementwise) for op in _ELEMENTWISE},
    **{op: Rule(channel_first) for op in _POOLS},
    **{op: Rule(reduce) for op in _REDUCE},
    "BatchNormalization": Rule(normalization),
    "InstanceNormalization": Rule(normalization),
    "LayerNormalization": Rule(layer_norm),
    "LpNormalization": Rule(lp_norm),
    "MeanVarianceNormalization": Rule(mvn),
    "Conv": Rule(conv, rewrite="conv_group"),
    "ConvTranspose": Rule(conv_transpose, rewrite="conv_group"),
    "Gemm": Rule(gemm),
    "MatMul": Rule(matmul),
    "Reshape": Rule(reshape, rewrite="reshape_target"),
    "Flatten": Rule(reshape),
    "Squeeze": Rule(reshape),
    "Unsqueeze": Rule(reshape),
    "Transpose": Rule(transpose),
    "Concat": Rule(concat),
    "Split": Rule(split, rewrite="split_sizes"),
    "Slice": Rule(slice_, rewrite="slice_bounds"),
    "Gather": Rule(gather),
    "Pad": Rule(pad),
    "Resize": Rule(resize, rewrite="resize_sizes"),
    "Upsample": Rule(resize),
    "Expand": Rule(expand, rewrite="expand_shape"),
    "Tile": Rule(expand),
    "ArgMax": Rule(arg_reduce),
    "ArgMin": Rule(arg_reduce),
    "Softmax": Rule(softmax),
    "LogSoftmax": Rule(softmax),
    "Hardmax": Rule(softmax),
    "QuantizeLinear": Rule(quantize),
    "DequantizeLinear": Rule(quantize),
    "Shape": Rule(shape_only, shapeless=True),
    "Size": Rule(shape_only, shapeless=True),
    "Constant": Rule(constant, shapeless=True),
    "ConstantOfShape": Rule(constant, shapeless=True),
    "LRN": Rule(
        mixing("mixes neighbouring channels (local response normalization)"), shapeless=True
    ),
    "GroupNormalization": Rule(group_norm, rewrite="group_norm_groups"),
    "DepthToSpace": Rule(mixing("moves channels into space"), shapeless=True),
    "SpaceToDepth": Rule(mixing("moves space into channels"), shapeless=True),
    "Einsum": Rule(
        mixing("contracts axes given by an equation (channels may mix)"), shapeless=True
    ),
}
"""Channel rule per op type of the default ONNX domain."""


UNSUPPORTED = Rule(unsupported, shapeless=True)


def rule_for(op_type: str, standard: bool) -> Rule:
    if not standard:
        return UNSUPPORTED
    return RULES.get(op_type, UNSUPPORTED)


def build_channels(graph) -> Channels:  # type: ignore[no-untyped-def]
    """Run every node's rule in topological order and stop what touches graph inputs/outputs."""
    ch = Channels(graph)
    for name in graph.inputs:
        ch.why[name] = f"graph input `{name}`"
    for node in graph.nodes:
        ctx = RuleContext(ch, node)
        rule = rule_for(node.op_type, node.standard)
        used = [t for t in node.outputs if t in graph.consumers or t in graph.outputs]
        unknown = [t for t in node.inputs + used if t and not graph.info(t).known]
        if unknown and not rule.shapeless:
            # name the cause where one is known (the unsupported op upstream), not its symptom
            why = ch.why.get(unknown[0])
            ctx.stop_all(why or f"shape of `{unknown[0]}` unknown at {ctx.where()}")
            continue
        if all(graph.is_const(t) for t in node.inputs if t) and node.inputs:
            ctx.no_channels(f"constant computed at {ctx.where()}")
            continue
        rule.channels(ctx)
        ctx.no_channels(ctx.inherit_why())
    for name in graph.outputs:
        a = ch.axis_of.get(name)
        if a is not None:
            ch.stop(ch.by_key[(name, a)].vars, f"graph output `{name}`")
    return ch
