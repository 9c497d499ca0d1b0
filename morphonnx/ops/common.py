"""Helpers the channel rules of several op families share."""

from __future__ import annotations

import functools
from collections.abc import Callable

from morphonnx.channels import RuleContext
from morphonnx.ops.kind import ChannelRule


def ints(ctx: RuleContext, attr: str, input_index: int, computed: bool = False) -> list[int] | None:
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


def passthrough(
    ctx: RuleContext, a: int, outputs: list[str] | None = None, b: int | None = None
) -> None:
    """Outputs keep the channels of input 0 (axis ``a``) on axis ``b`` (default: the same)."""
    src = ctx.ch.by_key[(ctx.input(0), a)]
    b = a if b is None else b
    for t in ctx.outputs if outputs is None else outputs:
        if not t or ctx.graph.shape(t) is None:
            continue
        if len(ctx.shape(t)) <= b or ctx.shape(t)[b] != src.size:
            mixes(ctx, f"changes the channel count of `{ctx.input(0)}`")
            return
        ctx.same(src, ctx.out(t, b))


def mixes(ctx: RuleContext, what: str) -> None:
    ctx.stop_all(f"{ctx.node.op_type} at {ctx.where()} {what}")


def mixing(what: str) -> ChannelRule:
    """The rule of an op that always mixes channels, for the reason ``what``."""

    def rule(ctx: RuleContext) -> None:
        mixes(ctx, what)

    return rule


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
