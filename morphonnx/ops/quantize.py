"""QuantizeLinear / DequantizeLinear: per-channel quantization parameters are group members."""

from __future__ import annotations

from morphonnx.channels import RuleContext
from morphonnx.ops.common import follows_input, mixes, passthrough
from morphonnx.ops.kind import OpKind


@follows_input
def quantize(ctx: RuleContext, x: str, a: int) -> None:
    """(De)QuantizeLinear: per-channel scale and zero point are members when on the channel axis."""
    src = ctx.ch.by_key[(x, a)]
    axis = int(ctx.node.attr("axis", 1)) % ctx.rank(x)
    for t in ctx.inputs[1:3]:
        if t and ctx.rank(t) == 1 and ctx.shape(t)[0] > 1:
            if axis != a or not ctx.is_const(t):
                mixes(ctx, "quantizes per channel along another axis")
                return
            ctx.same(src, ctx.weight(t, 0, "const"))
    passthrough(ctx, a)


KINDS = (
    OpKind("QuantizeLinear", quantize),
    OpKind("DequantizeLinear", quantize),
)
