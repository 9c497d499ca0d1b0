"""Gemm, MatMul and Einsum: products of activations with weights (or with each other)."""

from __future__ import annotations

import numpy as np

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
    two computed tensors (attention), see :func:`matmul_activations`."""
    a, b = ctx.input(0), ctx.input(1)
    if not ctx.is_const(a) and not ctx.is_const(b):
        matmul_activations(ctx)
        return
    if ctx.is_const(a) or ctx.rank(b) < 2 or ctx.rank(a) < 2:
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


ZERO_AT_ZERO = frozenset(
    """Relu LeakyRelu PRelu Tanh Neg Abs Identity Cast CastLike Dropout Sin Sqrt HardSwish Softsign
    Asinh Atan Sinh Tan Elu Selu Celu Mish Sign Floor Ceil Round ThresholdedRelu Gelu Erf Shrink
    Reshape Transpose Flatten Squeeze Unsqueeze Gather Slice Split Expand Tile Resize Upsample
    MaxPool AveragePool GlobalAveragePool GlobalMaxPool ReduceMean ReduceSum ReduceMax""".split()
)
"""Ops whose output is zero on a channel whose input is zero there (f(0) = 0, or moving data)."""


def zero_when_dead(ctx: RuleContext, tensor: str, depth: int = 0) -> bool:
    """Whether ``tensor``'s dead channels are exactly zero in the original with its dead slices
    zeroed: made by a layer whose filters (and bias) are members, through ops that keep zeros.
    A contraction between two activations drops a dead channel exactly only if one side is zero
    there."""
    memo = ctx.ch.zero_memo
    if tensor not in memo:
        memo[tensor] = _zero_when_dead(ctx, tensor, depth)
    return memo[tensor]


def _zero_when_dead(ctx: RuleContext, tensor: str, depth: int) -> bool:
    node = ctx.graph.producer.get(tensor)
    if node is None or not node.standard or depth > 200 or ctx.axis(tensor) is None:
        return False
    carrying = [t for t in node.inputs if t and ctx.axis(t) is not None]
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "Gemm") and ctx.is_const(node.inputs[1]):
        return True
    if op == "MatMul":
        if ctx.is_const(node.inputs[1]) and ctx.axis(node.inputs[0]) == ctx.rank(tensor) - 1:
            return ctx.axis(tensor) == ctx.rank(tensor) - 1
        return any(zero_when_dead(ctx, t, depth + 1) for t in carrying)
    if op in ("BatchNormalization", "InstanceNormalization"):
        return all(ctx.is_const(t) for t in node.inputs[1:3])  # gamma, beta are members
    if op == "Mul":
        return any(zero_when_dead(ctx, t, depth + 1) for t in carrying)
    if op == "Div":
        return node.inputs[0] in carrying and zero_when_dead(ctx, node.inputs[0], depth + 1)
    if op in ("Add", "Sub", "Sum", "Concat"):
        axis = ctx.axis(tensor)
        assert axis is not None
        for t in node.inputs:
            if not t or t in carrying:
                continue
            local = axis - (ctx.rank(tensor) - ctx.rank(t))
            per_channel = local >= 0 and ctx.shape(t)[local] == ctx.shape(tensor)[axis]
            value = ctx.value(t)
            if not per_channel and not (value is not None and not value.any()):
                return False  # an added constant that is not a member stays
        return all(zero_when_dead(ctx, t, depth + 1) for t in carrying)
    if op in ZERO_AT_ZERO or op == "Pad" and node.attr("mode", b"constant") != b"constant":
        return bool(carrying) and all(zero_when_dead(ctx, t, depth + 1) for t in carrying)
    if op == "Pad":
        fill = ctx.value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
        ok = not node.inputs[2:3] or not node.inputs[2] or (fill is not None and not fill.any())
        return ok and bool(carrying) and all(zero_when_dead(ctx, t, depth + 1) for t in carrying)
    if op == "Clip":
        lo, hi = (ctx.value(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
        low = node.attr("min", 0.0) if lo is None and "min" in node.attrs else lo
        high = node.attr("max", 0.0) if hi is None and "max" in node.attrs else hi
        inside = (low is None or float(np.max(low)) <= 0) and (
            high is None or float(np.min(high)) >= 0
        )
        return inside and zero_when_dead(ctx, node.inputs[0], depth + 1)
    return False


def matmul_activations(ctx: RuleContext) -> None:
    """MatMul of two computed tensors (attention). Channels on the contracted axis (q·kᵀ over the
    head dim) tie the two sides and leave the output (removing a channel that is zero on one
    side removes a zero term); channels on a's rows, b's columns or a batch axis (heads) pass to
    the output, tied with the other side's batch axis when it is not broadcast. A side broadcast
    along the other's channel axis (one k head shared by every q head) stops its own channels
    instead of meeting the other's."""
    a, b = ctx.input(0), ctx.input(1)
    out = ctx.outputs[0]
    ra, rb, r = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    ca, cb = ctx.axis(a), ctx.axis(b)
    if ra < 2 or rb < 2 or (ca is None and cb is None):
        ctx.stop_all(f"MatMul at {ctx.where()} multiplies computed tensors (channels mix)")
        return
    oa = None if ca is None else (r - 2 if ca == ra - 2 else ca + r - ra)
    ob = None if cb is None else (r - 1 if cb == rb - 1 else cb + r - rb)

    def broadcast(t: str, rank: int, o: int | None) -> bool:
        """``t`` has no extent along output axis ``o`` (size 1 or absent): broadcast there."""
        local = -1 if o is None else o - (r - rank)
        return o is not None and o < r - 2 and (local < 0 or ctx.shape(t)[local] == 1)

    # A side broadcast along the other's channel axis (multi-query attention's one k and v head
    # against q's heads) cannot follow those channels: its own stop, the other's pass.
    for side in (0, 1):
        t, rank, own, own_out, other_out = (a, ra, ca, oa, ob) if side == 0 else (b, rb, cb, ob, oa)
        contracted = own == (rank - 1 if side == 0 else rank - 2)
        if own is not None and other_out is not None and broadcast(t, rank, other_out):
            if contracted or own_out != other_out:
                ctx.stop(
                    ctx.ch.by_key[(t, own)],
                    f"MatMul at {ctx.where()} broadcasts `{t}` against the channels of the "
                    "other side (one shared head)",
                )
                if t == a:
                    ca, oa = None, None
                else:
                    cb, ob = None, None
    if ca == ra - 1 or cb == rb - 2:
        sa, sb = ctx.channels_of(a, ra - 1), ctx.channels_of(b, rb - 2)
        ctx.same(sa, sb)
        if not (zero_when_dead(ctx, a) or zero_when_dead(ctx, b)):
            ctx.stop(
                sa,
                f"MatMul at {ctx.where()} contracts channels of `{a}` and `{b}` that are not "
                "zero when removed (neither side comes straight from a layer's filters)",
            )
        ctx.no_channels(f"MatMul at {ctx.where()} contracts the channels of `{a}`")
        return
    if oa is not None and ob is not None and oa != ob:
        ctx.stop_all(f"MatMul at {ctx.where()} would carry channels on two axes of `{out}`")
        return
    o = oa if oa is not None else ob
    assert o is not None
    y = ctx.out(out, o)
    for t, rank, own in ((a, ra, ca), (b, rb, cb)):
        local = o - (r - rank)
        is_batch = o < r - 2
        if own is not None:
            ctx.same(ctx.ch.by_key[(t, own)], y)
        elif is_batch and local >= 0 and ctx.shape(t)[local] > 1:
            ctx.same(ctx.channels_of(t, local), y)  # a batch axis not broadcast: stopped, why


def _gemm_macs(node: Node, a: Shape, b: Shape, y: Shape) -> int:
    """M*N*K: K is A's columns (rows if transA)."""
    k = a[0] if node.attr("transA", 0) else a[-1]
    return numel(y) * max(k, 0)


def _gemm_sides(node: Node, x_rank: int, y_rank: int) -> tuple[int, int]:
    return 0 if node.attr("transA", 0) else 1, 1


KINDS = (
    OpKind("Gemm", gemm, layer=Layer(macs=_gemm_macs, sides=_gemm_sides, bias=2)),
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
