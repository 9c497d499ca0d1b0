"""Gemm, MatMul and Einsum: products of activations with weights (or with each other)."""

from __future__ import annotations

from morphonnx.channels import RuleContext
from morphonnx.ir import Node, Shape
from morphonnx.ops.common import mixes, mixing, passthrough
from morphonnx.ops.kind import Layer, OpKind, numel


def gemm(ctx: RuleContext) -> None:
    """Gemm: Y = A' B' + C. With constant B, output features are B's columns (rows if transB)."""
    a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
    ta, tb = int(ctx.node.attr("transA", 0)), int(ctx.node.attr("transB", 0))
    if not ctx.is_const(b) or ctx.is_const(a):
        mixes(ctx, "multiplies two computed tensors")
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
    if ctx.is_const(a) or not ctx.is_const(b) or ctx.rank(b) < 2 or ctx.rank(a) < 2:
        mixes(ctx, "multiplies computed tensors (channels mix)")
        return
    out = ctx.outputs[0]
    own = ctx.axis(a)
    ra = ctx.rank(a)
    if own is not None and own != ra - 1:
        # channels ride along a batch / row axis; the new features of b are not followed
        passthrough(ctx, own, [out], own + ctx.rank(out) - ra)
        ctx.stop(
            ctx.weight(b, -1, "producer"), f"MatMul at {ctx.where()} is not on the channel axis"
        )
        return
    y = ctx.out(out, ctx.rank(out) - 1)
    ctx.same(y, ctx.weight(b, -1, "producer"))
    ctx.same(ctx.channels_of(a, ra - 1), ctx.weight(b, -2, "consumer"))


def _gemm_macs(node: Node, a: Shape, b: Shape, y: Shape) -> int:
    """M*N*K: K is A's columns (rows if transA)."""
    k = a[0] if node.attr("transA", 0) else a[-1]
    return numel(y) * max(k, 0)


def _gemm_sides(node: Node, x_rank: int, y_rank: int) -> tuple[int, int]:
    return 0 if node.attr("transA", 0) else 1, 1


KINDS = (
    OpKind("Gemm", gemm, layer=Layer(macs=_gemm_macs, sides=_gemm_sides)),
    OpKind(
        "MatMul",
        matmul,
        # every output is a K-long dot product
        layer=Layer(
            macs=lambda node, a, b, y: numel(y) * max(a[-1], 0),
            sides=lambda node, x_rank, y_rank: (x_rank - 1, y_rank - 1),
        ),
    ),
    OpKind(
        "Einsum",
        mixing("contracts axes given by an equation (channels may mix)"),
        shapeless=True,
    ),
)
