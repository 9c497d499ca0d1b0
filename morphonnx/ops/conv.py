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
    if not ctx.is_const(w):
        mixes(ctx, f"takes its weights `{w}` from a computed tensor")
        return
    gr = grouping(ctx.node, ctx.shape(w))
    y = ctx.out(ctx.outputs[0], 1)
    ctx.same(y, ctx.weight(w, 0, "producer"))
    if b:
        ctx.same(y, ctx.weight(b, 0, "bias"))
    xs = ctx.channels_of(x, 1)
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


def conv_group(ctx: RewriteContext) -> None:
    """A depthwise conv has one group per input channel: ``group`` follows the input width."""
    x, w = ctx.node.inputs[0], ctx.node.inputs[1]
    if ctx.changed(x) and grouping(ctx.node, ctx.old_shape(w)).depthwise:
        ctx.set_attr("group", ctx.shape(x)[1])


def _conv_kind(op_type: str, rule: ChannelRule, macs: Macs) -> OpKind:
    """Channels on axis 1 of input and output, ``group`` rewritten for depthwise ones."""
    layer = Layer(macs=macs, sides=lambda node, x_rank, y_rank: (1, 1), grouping=grouping)
    return OpKind(op_type, rule, rewrite=conv_group, layer=layer)


KINDS = (
    _conv_kind("Conv", conv, lambda node, x, w, y: numel(y) * numel(w[1:])),
    _conv_kind("ConvTranspose", conv_transpose, lambda node, x, w, y: numel(x) * numel(w[1:])),
)
