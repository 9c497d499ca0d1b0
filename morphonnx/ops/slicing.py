"""Ops that cut, join or pick parts of tensors: Concat, Split, Slice, Gather, Pad."""

from __future__ import annotations

import numpy as np

from morphonnx.channels import RuleContext
from morphonnx.ops.common import follows_input, ints, mixes, passthrough
from morphonnx.ops.elementwise import elementwise
from morphonnx.ops.kind import OpKind
from morphonnx.ops.rewrite import RewriteContext


def concat(ctx: RuleContext) -> None:
    """Concat along the channel axis: input i owns channels offset_i .. offset_i+C_i-1."""
    out = ctx.outputs[0]
    rank = ctx.rank(out)
    cat = int(ctx.node.attr("axis", 1)) % rank
    axes = [ctx.axis(t) for t in ctx.inputs if t]
    known = [a for a in axes if a is not None]
    if not known:
        ctx.no_channels(ctx.inherit_why())
        return
    if cat not in known:
        elementwise(ctx)
        return
    y = ctx.out(out, cat)
    offset = 0
    for t in ctx.inputs:
        if not t:
            continue
        n = ctx.shape(t)[cat]
        part = ctx.weight(t, cat, "const") if ctx.is_const(t) else ctx.channels_of(t, cat)
        ctx.tie(part, np.arange(n), y, offset + np.arange(n))
        offset += n


@follows_input
def split(ctx: RuleContext, x: str, a: int) -> None:
    """Split along the channel axis: output j owns input channels offset_j .. offset_j+C_j-1."""
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis != a:
        passthrough(ctx, a)
        return
    src = ctx.ch.by_key[(x, a)]
    offset = 0
    for t in ctx.outputs:
        n = ctx.shape(t)[a]
        if t:
            ctx.tie(src, offset + np.arange(n), ctx.out(t, a), np.arange(n))
        offset += n


@follows_input
def slice_(ctx: RuleContext, x: str, a: int) -> None:
    """Slice: on the channel axis (step 1), output channel i is input channel start+i. Bounds
    computed from the channel count (torch ``chunk``) are read at the analyzed shapes; the
    rewrite writes them as constants, so a Slice that also cuts other axes must have constant
    bounds (theirs may follow batch or spatial dims at run time)."""
    rank = ctx.rank(x)
    attr_form = "starts" in ctx.node.attrs
    axes = ints(ctx, "axes", 3)
    if ctx.input(3) and axes is None:
        mixes(ctx, "slices axes computed at run time")
        return
    if axes is None:
        count = len(ctx.node.attr("starts")) if attr_form else ctx.shape(ctx.input(1))[0]
        axes = list(range(count))
    axes = [int(v) % rank for v in axes]
    if a not in axes:
        passthrough(ctx, a)
        return
    k = axes.index(a)
    steps = ints(ctx, "steps", 4)
    if (ctx.input(4) and steps is None) or (steps is not None and steps[k] != 1):
        mixes(ctx, "slices the channel axis with a step other than 1 (or unknown)")
        return
    starts, ends = ints(ctx, "starts", 1, True), ints(ctx, "ends", 2, True)
    if not attr_form and len(axes) > 1:  # computed bounds become constants: only if alone
        if not (ctx.is_const(ctx.input(1)) and ctx.is_const(ctx.input(2))):
            starts = None
    if starts is None or ends is None:
        mixes(ctx, "slices the channel axis with bounds computed at run time")
        return
    n_in = ctx.shape(x)[a]
    start = starts[k]
    start = max(0, min(n_in, start + n_in if start < 0 else start))
    n_out = ctx.shape(ctx.outputs[0])[a]
    ctx.tie(
        ctx.ch.by_key[(x, a)],
        start + np.arange(n_out),
        ctx.out(ctx.outputs[0], a),
        np.arange(n_out),
    )


@follows_input
def gather(ctx: RuleContext, x: str, a: int) -> None:
    """Gather off the channel axis passes channels on; on the channel axis it picks channels."""
    idx = ctx.input(1)
    axis = int(ctx.node.attr("axis", 0)) % ctx.rank(x)
    if axis == a:
        mixes(ctx, "gathers along the channel axis")
        return
    shift = ctx.rank(idx) - 1 if a > axis else 0
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], a + shift))


@follows_input
def pad(ctx: RuleContext, x: str, a: int) -> None:
    """Pad passes channels on unless it pads the channel axis (torch's ``F.pad`` computes the
    full pads vector from the list it is given: read like constants)."""
    pads = ints(ctx, "pads", 1, True)
    rank = ctx.rank(x)
    axes = ints(ctx, "axes", 3) if len(ctx.inputs) > 3 else None
    axes = [v % rank for v in axes] if axes else list(range(rank))
    if pads is None:
        mixes(ctx, "pads by amounts computed at run time")
        return
    if a in axes:
        k = axes.index(a)
        if pads[k] or pads[k + len(axes)]:
            mixes(ctx, "pads the channel axis")
            return
    passthrough(ctx, a)


def split_sizes(ctx: RewriteContext) -> None:
    x = ctx.node.inputs[0]
    if not ctx.changed(x):
        return
    axis = int(ctx.node.attr("axis", 0)) % len(ctx.old_shape(x))
    sizes = np.array([ctx.shape(t)[axis] for t in ctx.node.outputs], dtype=np.int64)
    if ctx.graph.opset < 13:
        ctx.set_attr("split", sizes.tolist())
    else:
        for k, a in enumerate(ctx.proto.attribute):
            if a.name == "num_outputs":
                del ctx.proto.attribute[k]
                break
        ctx.set_const_input(1, sizes)


def slice_bounds(ctx: RewriteContext) -> None:
    x, y = ctx.node.inputs[0], ctx.node.outputs[0]
    kept = ctx.kept(x)
    if kept is None or not ctx.changed(x):
        return
    rank = len(ctx.old_shape(x))
    axis = ctx.channels.axis_of[x]
    attr_form = "starts" in ctx.node.attrs
    raw_axes = ctx.node.attr("axes") if attr_form else ctx.const_input(3)
    if raw_axes is None:
        raw_axes = range(
            len(ctx.node.attr("starts")) if attr_form else ctx.old_shape(ctx.proto.input[1])[0]
        )
    axes = [int(v) % rank for v in raw_axes]
    if axis not in axes:
        return
    if attr_form:
        starts, ends = list(ctx.node.attr("starts")), list(ctx.node.attr("ends"))
    else:  # constants, or computed from channel counts (the rule checked they are known)
        bounds = [ctx.bound_input(i) for i in (1, 2)]
        assert bounds[0] is not None and bounds[1] is not None
        starts, ends = bounds[0].reshape(-1).tolist(), bounds[1].reshape(-1).tolist()
    k = axes.index(axis)
    n_in = ctx.old_shape(x)[axis]
    start = starts[k] + n_in if starts[k] < 0 else starts[k]
    start = max(0, min(n_in, start))
    new_start = int(np.searchsorted(kept, start))
    starts[k] = new_start
    ends[k] = new_start + ctx.shape(y)[axis]
    if attr_form:
        ctx.set_attr("starts", starts)
        ctx.set_attr("ends", ends)
    else:
        ctx.set_const_input(1, np.array(starts, dtype=np.int64))
        ctx.set_const_input(2, np.array(ends, dtype=np.int64))


KINDS = (
    OpKind("Concat", concat, expands=False),
    OpKind("Split", split, rewrite=split_sizes, expands=False),
    OpKind("Slice", slice_, rewrite=slice_bounds, expands=False),
    OpKind("Gather", gather, expands=False),
    OpKind("Pad", pad, expands=False),
)
