"""Reductions and scans over axes: pooling, Reduce*, ArgMax/ArgMin, softmax-like normalizers,
CumSum."""

from __future__ import annotations

from morphonnx.channels import RuleContext
from morphonnx.ops.common import follows_input, ints, mixes, passthrough
from morphonnx.ops.kind import OpKind


@follows_input
def channel_first(ctx: RuleContext, x: str, a: int) -> None:
    """Ops that treat axis 1 as channels and act per channel (pooling)."""
    if a != 1:
        mixes(ctx, f"pools over axis {a}, where the channels of `{x}` are")
        return
    passthrough(ctx, 1)


@follows_input
def reduce(ctx: RuleContext, x: str, a: int) -> None:
    """Reductions over other axes (global pooling as ReduceMean) pass channels; over the channel
    axis they mix them."""
    rank = ctx.rank(x)
    axes = ints(ctx, "axes", 1)
    if axes is None and ctx.input(1):
        mixes(ctx, "reduces over axes computed at run time")
        return
    if not axes:
        if ctx.node.attr("noop_with_empty_axes", 0):
            passthrough(ctx, a)
            return
        axes = list(range(rank))
    axes = [v % rank for v in axes]
    if a in axes:
        mixes(ctx, "reduces over the channel axis (channels mix)")
        return
    keep = int(ctx.node.attr("keepdims", 1))
    b = a if keep else a - sum(1 for v in axes if v < a)
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], b))


@follows_input
def arg_reduce(ctx: RuleContext, x: str, a: int) -> None:
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis == a:
        mixes(ctx, "reduces over the channel axis")
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
        mixes(ctx, f"normalizes over the channel axis {a} (channels mix)")
        return
    passthrough(ctx, a)


@follows_input
def cumsum(ctx: RuleContext, x: str, a: int) -> None:
    """CumSum (DETR-style position embeddings, box decoders) accumulates along its ``axis``
    input: channels pass along other axes; along the channel axis each output sums the channels
    before it (channels mix)."""
    axis = ints(ctx, "axis", 1)
    if axis is None:
        mixes(ctx, "accumulates along an axis computed at run time")
        return
    if axis[0] % ctx.rank(x) == a:
        mixes(ctx, "accumulates along the channel axis (channels mix)")
        return
    passthrough(ctx, a)


_POOLS = """MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool""".split()
_REDUCE = """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare""".split()
_NON_EXPANDING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Softmax"}

KINDS = (
    *(OpKind(op, channel_first, expands=op not in _NON_EXPANDING) for op in _POOLS),
    *(OpKind(op, reduce) for op in _REDUCE),
    OpKind("ArgMax", arg_reduce),
    OpKind("ArgMin", arg_reduce),
    OpKind("Softmax", softmax, expands=False),
    OpKind("LogSoftmax", softmax),
    OpKind("Hardmax", softmax),
    OpKind("CumSum", cumsum),
)
