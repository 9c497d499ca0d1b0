"""Element-wise ops: unary ones on one activation, broadcasting ones between tensors."""

from __future__ import annotations

from morphonnx.channels import Role, RuleContext
from morphonnx.ops.common import follows_input, passthrough
from morphonnx.ops.kind import OpKind

_ROLES: dict[str, Role] = {"Add": "bias", "Sub": "bias", "Mul": "scale", "Div": "scale"}
"""Role of a per-channel constant operand; others are ``const``."""


@follows_input
def unary(ctx: RuleContext, x: str, a: int) -> None:
    """Element-wise on one activation (activations, Cast, Identity, Dropout, Clip, ...)."""
    passthrough(ctx, a)


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
    role = _ROLES.get(ctx.node.op_type, "const")
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


_UNARY = """Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Softplus Softsign
Mish ThresholdedRelu Erf Exp Log Sqrt Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos Tan Asin Acos
Atan Sinh Cosh Asinh Acosh Atanh IsNaN IsInf Not BitwiseNot Identity Cast CastLike Dropout Clip
Shrink Swish""".split()
_BINARY = """Add Sub Mul Div Pow Max Min Sum Mean Where PRelu Mod Equal Less LessOrEqual
Greater GreaterOrEqual And Or Xor BitShift BitwiseAnd BitwiseOr BitwiseXor""".split()
_PER_CHANNEL = {"Add", "Sub", "Mul", "Div", "PRelu"}
_NON_EXPANDING = set(
    """Relu LeakyRelu Sigmoid HardSigmoid Tanh Elu Clip Abs Neg Identity Dropout Max Min""".split()
)

KINDS = (
    *(OpKind(op, unary, expands=op not in _NON_EXPANDING) for op in _UNARY),
    *(
        OpKind(op, elementwise, per_channel=op in _PER_CHANNEL, expands=op not in _NON_EXPANDING)
        for op in _BINARY
    ),
)
