"""Conv and ConvTranspose: weighted layers whose channels may be split into groups."""

from __future__ import annotations

import numpy as np

from morphonnx.channels import RuleContext, Slot
from morphonnx.ir import Node, Shape
from morphonnx.ops.common import mixes
from morphonnx.ops.kind import ChannelRule, Grouping, Layer, Macs, OpKind, numel
from morphonnx.ops.rewrite import RewriteContext


def grouping(node: Node, weight: Shape) -> Grouping:
    """The one depthwise / grouped test. Conv weights are (C_out, C_in/group, k...),
    ConvTranspose weights (C_in, C_out/group, k...)."""
    g = int(node.attr("group", 1))
    if node.op_type == "ConvTranspose":
        return Grouping(g, weight[0] // g, weight[1])
    return Grouping(g, weight[1], weight[0] // g)


def conv(ctx: RuleContext) -> None:
    """Conv: output channels are the weight's filters (axis 0); input channels meet the weight's
    axis 1. Depthwise: input channel i feeds outputs i*m..i*m+m-1. Grouped: channel p of every
    group is tied, so groups keep equal sizes."""
    x, w, b = ctx.input(0), ctx.input(1), ctx.input(2)
    chain = None if ctx.is_const(w) else weight_chain(ctx, w)
    if not ctx.is_const(w) and chain is None:
        mixes(ctx, f"takes its weights `{w}` from a computed tensor")
        return
    gr = grouping(ctx.node, ctx.shape(w))
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
        if not gr.depthwise:
            how = "with statistics over its input channels" if over_inputs else "at run time"
            ctx.stop(xs, f"Conv at {ctx.where()} computes its weights `{w}` {how}")
        if gr.groups > 1:
            _group_ties(ctx, xs, y, gr, None)
        return
    ctx.same(y, ctx.weight(w, 0, "producer"))
    # a plain conv reads every input channel through axis 1 (size 1 for a one-channel input);
    # a depthwise one has nothing per input channel there
    consumer = None if gr.depthwise else ctx.weight(w, 1, "consumer")
    _group_ties(ctx, xs, y, gr, consumer)


def conv_transpose(ctx: RuleContext) -> None:
    """ConvTranspose: weight is (C_in, C_out/group, k...); axis 0 meets the input, axis 1 the
    output."""
    x, w, b = ctx.input(0), ctx.input(1), ctx.input(2)
    if not ctx.is_const(w):
        mixes(ctx, f"takes its weights `{w}` from a computed tensor")
        return
    gr = grouping(ctx.node, ctx.shape(w))
    g, cin_g, cout_g = gr.groups, gr.in_per_group, gr.out_per_group
    cin = ctx.shape(w)[0]
    y = ctx.out(ctx.outputs[0], 1)
    if b:
        ctx.same(y, ctx.weight(b, 0, "bias"))
    xs = ctx.channels_of(x, 1)
    ctx.same(xs, ctx.weight(w, 0, "consumer"))
    if gr.depthwise:  # output block of input i is i*m .. i*m+m-1
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


def _group_ties(ctx: RuleContext, xs: Slot, y: Slot, gr: Grouping, consumer: Slot | None) -> None:
    g, cin_g, cout_g = gr.groups, gr.in_per_group, gr.out_per_group
    if g == 1:
        assert consumer is not None
        ctx.same(xs, consumer)
        return
    if gr.depthwise:  # channel multiplier cout_g
        ctx.tie(xs, np.arange(g)[:, None], y, np.arange(g * cout_g).reshape(g, cout_g))
        return
    p = np.arange(cin_g)
    ctx.tie(xs, np.arange(g)[:, None] * cin_g + p[None, :], xs, p[None, :])
    if consumer is not None:
        ctx.tie(xs, p, consumer, p)
    q = np.arange(cout_g)
    ctx.tie(y, np.arange(g)[:, None] * cout_g + q[None, :], y, q[None, :])


WEIGHT_CHAIN_OPS = frozenset(
    """ReduceMean ReduceSum ReduceSumSquare ReduceL2 ReduceMax ReduceMin Sub Add Mul Div Sqrt Pow
    Reciprocal Neg Abs Identity Cast Max Min""".split()
)
"""Ops a weight may be computed with (standardization) and keep its filters independent."""


def weight_chain(ctx: RuleContext, w: str) -> tuple[list[str], list[str], bool] | None:
    """A weight computed from constants filter by filter (weight standardization: mean and
    variance over the rest of each filter, a per-filter gain): the computed tensors, the
    constants with a slice per filter on axis 0, and whether the statistics span axis 1 (the
    input channels, which then may not be removed). None when it is computed another way."""
    rank, filters = ctx.rank(w), ctx.shape(w)[0]
    tensors: list[str] = []
    consts: list[str] = []
    over_inputs = False
    stack, seen = [w], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if ctx.is_const(t):
            shape = ctx.shape(t)
            if len(shape) == rank and shape[0] == filters:
                consts.append(t)
            elif len(shape) == rank and shape[0] != 1:
                return None
            continue
        node = ctx.graph.producer.get(t)
        if node is None or not node.standard or node.op_type not in WEIGHT_CHAIN_OPS:
            return None
        if ctx.axis(t) is not None or ctx.rank(t) != rank or ctx.shape(t)[0] != filters:
            return None
        tensors.append(t)
        inputs = node.inputs
        if node.op_type.startswith("Reduce"):
            axes = node.attr("axes")
            if axes is None and len(inputs) > 1 and inputs[1]:
                value = ctx.value(inputs[1])
                axes = None if value is None else value.reshape(-1).tolist()
            if axes is None or not node.attr("keepdims", 1):
                return None
            axes = [int(v) % rank for v in axes]
            if 0 in axes:
                return None
            over_inputs = over_inputs or 1 in axes
            inputs = inputs[:1]
        stack.extend(inputs)
    return tensors, consts, over_inputs


def conv_group(ctx: RewriteContext) -> None:
    """A depthwise conv has one group per input channel: ``group`` follows the input width."""
    x, w = ctx.node.inputs[0], ctx.node.inputs[1]
    if ctx.changed(x) and grouping(ctx.node, ctx.old_shape(w)).depthwise:
        ctx.set_attr("group", ctx.shape(x)[1])


def _conv_kind(op_type: str, rule: ChannelRule, macs: Macs) -> OpKind:
    """Channels on axis 1 of input and output, ``group`` rewritten for depthwise ones."""
    layer = Layer(macs=macs, sides=lambda node, x_rank, y_rank: (1, 1), grouping=grouping, bias=2)
    return OpKind(op_type, rule, rewrite=conv_group, layer=layer)


KINDS = (
    _conv_kind("Conv", conv, lambda node, x, w, y: numel(y) * numel(w[1:])),
    _conv_kind("ConvTranspose", conv_transpose, lambda node, x, w, y: numel(x) * numel(w[1:])),
)
