"""Ops that carry no channels of their own: shape reads and constants."""

from __future__ import annotations

from morphonnx.channels import RuleContext
from morphonnx.ops.kind import OpKind


def shape_only(ctx: RuleContext) -> None:
    """Shape / Size read only the shape, which pruning keeps consistent at run time."""
    ctx.no_channels(f"shape computation at {ctx.where()}")


def constant(ctx: RuleContext) -> None:
    """Constants carry no channels of their own; rules that consume them name the weight axes."""
    ctx.no_channels(f"constant from {ctx.where()}")


KINDS = (
    OpKind("Shape", shape_only, shapeless=True),
    OpKind("Size", shape_only, shapeless=True),
    OpKind("Constant", constant, shapeless=True),
    OpKind("ConstantOfShape", constant, shapeless=True),
)
