"""Normalizations: per-channel ones (their parameters are group members) and mixing ones."""

from __future__ import annotations

import numpy as np

from morphonnx.channels import Role, RuleContext
from morphonnx.ir import Node
from morphonnx.ops.common import follows_input, mixes, mixing, passthrough
from morphonnx.ops.kind import OpKind
from morphonnx.ops.rewrite import RewriteContext


def normalization(ctx: RuleContext) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    x = ctx.input(0)
    if ctx.axis(x) not in (None, 1):
        mixes(ctx, "normalizes axis 1, not the channel axis")
        return
    if ctx.axis(x) is None and not any(ctx.is_const(t) for t in ctx.inputs[1:]):
        ctx.no_channels(ctx.inherit_why())
        return
    src = ctx.channels_of(x, 1)
    y = ctx.out(ctx.outputs[0], 1)
    ctx.same(src, y)
    roles: list[Role] = ["gamma", "beta", "stat", "stat"]
    for t, role in zip(ctx.inputs[1:], roles, strict=False):
        if t and ctx.is_const(t) and ctx.rank(t) == 1 and ctx.shape(t)[0] == src.size:
            ctx.same(src, ctx.weight(t, 0, role))
        elif t:
            ctx.stop(src, f"{ctx.node.op_type} at {ctx.where()} has a non-constant parameter `{t}`")


def normalized_from(node: Node, rank: int) -> int | None:
    """The first axis LayerNormalization / RMSNormalization normalize (with every later one);
    None for any other op."""
    if node.op_type not in ("LayerNormalization", "RMSNormalization"):
        return None
    return int(node.attr("axis", -1)) % rank


@follows_input
def layer_norm(ctx: RuleContext, x: str, a: int) -> None:
    """LayerNormalization / RMSNormalization mix the axes from ``axis`` on; other axes pass
    (their scale and bias span the normalized axes: no per-channel parameters)."""
    first = normalized_from(ctx.node, ctx.rank(x))
    if first is not None and a >= first:
        mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    passthrough(ctx, a, ctx.outputs[:1])


@follows_input
def lp_norm(ctx: RuleContext, x: str, a: int) -> None:
    if int(ctx.node.attr("axis", -1)) % ctx.rank(x) == a:
        mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    passthrough(ctx, a)


@follows_input
def mvn(ctx: RuleContext, x: str, a: int) -> None:
    if a in [v % ctx.rank(x) for v in ctx.node.attr("axes", [0, 2, 3])]:
        mixes(ctx, "normalizes over the channel axis (channels mix)")
        return
    passthrough(ctx, a)


def group_norm(ctx: RuleContext) -> None:
    """GroupNormalization: each group's statistics are over all its channels, so a group lives or
    dies whole (removing one channel would change the others' normalization). From opset 21,
    scale and bias have one entry per channel. The opset-18 form (one per group) is deprecated:
    onnx.checker refuses it, so a pruned model could not be checked."""
    x = ctx.input(0)
    if ctx.graph.opset < 21:
        ctx.stop_all(
            f"GroupNormalization at {ctx.where()} is the deprecated opset-18 form (onnx.checker "
            "refuses it); export at opset 21 or as Reshape + InstanceNormalization"
        )
        return
    if ctx.axis(x) not in (None, 1):
        ctx.stop_all(f"GroupNormalization at {ctx.where()} normalizes axis 1, not the channel axis")
        return
    xs = ctx.channels_of(x, 1)
    g, c = int(ctx.node.attr("num_groups", 1)), xs.size
    if g < 1 or c % g:
        ctx.stop_all(f"GroupNormalization at {ctx.where()} has {g} groups of {c} channels")
        return
    block = np.arange(c).reshape(g, c // g)
    ctx.tie(xs, block, xs, block[:, :1])
    ctx.same(xs, ctx.out(ctx.outputs[0], 1))
    roles: list[Role] = ["gamma", "beta"]
    for t, role in zip(ctx.inputs[1:3], roles, strict=False):
        if ctx.is_const(t) and ctx.rank(t) == 1 and ctx.shape(t)[0] == c:
            ctx.same(xs, ctx.weight(t, 0, role))
        else:
            ctx.stop(xs, f"GroupNormalization at {ctx.where()} has a non-constant parameter `{t}`")


def group_norm_groups(ctx: RewriteContext) -> None:
    """Whole groups are removed: ``num_groups`` follows the width at the group size."""
    x = ctx.node.inputs[0]
    if ctx.changed(x):
        size = ctx.old_shape(x)[1] // int(ctx.node.attr("num_groups", 1))
        ctx.set_attr("num_groups", ctx.shape(x)[1] // size)


KINDS = (
    OpKind("BatchNormalization", normalization, per_channel=True, divisors=(4,)),
    OpKind("InstanceNormalization", normalization, per_channel=True),
    OpKind("LayerNormalization", layer_norm),
    OpKind("RMSNormalization", layer_norm),
    OpKind("LpNormalization", lp_norm),
    OpKind("MeanVarianceNormalization", mvn),
    OpKind(
        "LRN",
        mixing("mixes neighbouring channels (local response normalization)"),
        shapeless=True,
    ),
    OpKind("GroupNormalization", group_norm, rewrite=group_norm_groups, per_channel=True),
)
