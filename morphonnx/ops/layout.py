"""Layout ops: the data keeps its values but changes shape, order or repetition."""

from __future__ import annotations

import math

import numpy as np
from onnx import helper, numpy_helper

from morphonnx.channels import RuleContext
from morphonnx.ops.common import follows_input, mixes, mixing, passthrough
from morphonnx.ops.kind import OpKind
from morphonnx.ops.rewrite import RewriteContext


def reshape_map(
    in_shape: tuple[int, ...], a: int, out_shape: tuple[int, ...]
) -> tuple[int, np.ndarray] | None:
    """Where channel axis ``a`` lands when data keeps its order but changes shape.

    Returns the output axis and, per channel, the indices it owns there (a block after a Flatten,
    a stride after an NHWC flatten), or None when the channel axis is split across several axes.
    """
    c = in_shape[a]
    outer = math.prod(in_shape[:a])
    inner = math.prod(in_shape[a + 1 :])
    fits = []  # output axes b where outer x channel x inner splits as before(b) | o*c*i | after(b)
    for b, d in enumerate(out_shape):
        before, after = math.prod(out_shape[:b]), math.prod(out_shape[b + 1 :])
        if before and after and not outer % before and not inner % after:
            if d == (outer // before) * c * (inner // after):
                fits.append(b)
    if not fits:
        return None
    # with one channel several axes fit: prefer the same axis, then a real (non-1) axis
    b = a if a in fits else next((f for f in fits if out_shape[f] > 1), fits[0])
    o = outer // math.prod(out_shape[:b])
    i = inner // math.prod(out_shape[b + 1 :])
    pos = (
        np.arange(o)[None, :, None] * (c * i)
        + np.arange(c)[:, None, None] * i
        + np.arange(i)[None, None, :]
    ).reshape(c, o * i)
    return b, pos


@follows_input
def reshape(ctx: RuleContext, x: str, a: int) -> None:
    """Reshape / Flatten / Squeeze / Unsqueeze: follow the channel axis through the new shape."""
    out = ctx.outputs[0]
    found = reshape_map(ctx.shape(x), a, ctx.shape(out))
    if found is None:
        mixes(ctx, f"splits the channel axis of `{x}` ({ctx.shape(x)} -> {ctx.shape(out)})")
        return
    b, pos = found
    ctx.tie(ctx.ch.by_key[(x, a)], np.arange(pos.shape[0])[:, None], ctx.out(out, b), pos)


@follows_input
def transpose(ctx: RuleContext, x: str, a: int) -> None:
    perm = ctx.node.attr("perm") or list(reversed(range(ctx.rank(x))))
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(ctx.outputs[0], list(perm).index(a)))


@follows_input
def resize(ctx: RuleContext, x: str, a: int) -> None:
    """Resize / Upsample pass channels on when the channel axis keeps its size."""
    out = ctx.outputs[0]
    if ctx.shape(out)[a] != ctx.shape(x)[a]:
        mixes(ctx, "rescales the channel axis")
        return
    passthrough(ctx, a)


@follows_input
def expand(ctx: RuleContext, x: str, a: int) -> None:
    """Expand / Tile: channels pass when the channel axis is not repeated."""
    out = ctx.outputs[0]
    b = a + ctx.rank(out) - ctx.rank(x)
    if ctx.shape(out)[b] != ctx.shape(x)[a]:
        mixes(ctx, "repeats the channel axis")
        return
    ctx.same(ctx.ch.by_key[(x, a)], ctx.out(out, b))


def reshape_target(ctx: RewriteContext) -> None:
    out = ctx.node.outputs[0]
    if not ctx.changed(out):
        return
    if "shape" in ctx.node.attrs:  # opset < 5
        target = np.array(ctx.node.attr("shape"), dtype=np.int64)
    else:
        value = ctx.const_input(1)
        if value is None:
            _computed_target(ctx)
            return
        target = value.astype(np.int64).copy()
    new = ctx.shape(out)
    for i, (old_d, new_d) in enumerate(zip(ctx.old_shape(out), new, strict=True)):
        if old_d != new_d and target[i] not in (-1, 0):
            target[i] = new_d
    if "shape" in ctx.node.attrs:
        ctx.set_attr("shape", target.tolist())
    else:
        ctx.set_const_input(1, target)


def _computed_target(ctx: RewriteContext) -> None:
    """A target computed at run time follows the pruned shapes where it reads them (``Shape`` of
    the input), not where it holds a channel count as a constant (keras ``Tensordot``:
    ``Concat(Gather(Shape(x)), [4C])``, paddle heads: ``[Shape(x)[0], C]``). Entries that come
    out wrong at the pruned shapes and are constant (the same when every run-time dim moves) get
    the difference added, by an ``Add`` inserted before the Reshape."""
    x, target, out = ctx.node.inputs[0], ctx.proto.input[1], ctx.node.outputs[0]
    value = ctx.channels.value_at(target, ctx.new_shape)
    moved = ctx.channels.value_at(target, ctx.new_shape, moved=True)
    if value is None or moved is None or value.dtype.kind not in "iu":
        return  # not evaluable: analyze's dry run reports the group
    value, moved = value.reshape(-1).astype(np.int64), moved.reshape(-1)
    want = ctx.shape(out)
    got = reshaped(ctx.shape(x), value, bool(ctx.node.attr("allowzero", 0)))
    if got == want:
        return
    delta = np.zeros_like(value)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g != w and value[i] > 0 and moved[i] == value[i]:
            delta[i] = w - value[i]
    if delta.any():
        name = f"{ctx.node.name}__pruned_target"
        ctx.model.graph.initializer.append(numpy_helper.from_array(delta, f"{name}_delta"))
        ctx.insert(helper.make_node("Add", [target, f"{name}_delta"], [name], name=f"{name}_add"))
        ctx.proto.input[1] = name


def reshaped(shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...]:
    """The output shape of ``Reshape(x of shape, target)``."""
    dims = [shape[i] if d == 0 and not allowzero else int(d) for i, d in enumerate(target)]
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(shape) // rest if rest else 0
    return tuple(dims)


def resize_sizes(ctx: RewriteContext) -> None:
    out = ctx.node.outputs[0]
    if ctx.changed(out) and ctx.const_input(3) is not None:
        ctx.set_const_input(3, np.array(ctx.shape(out), dtype=np.int64))


def expand_shape(ctx: RewriteContext) -> None:
    out = ctx.node.outputs[0]
    value = ctx.const_input(1)
    if not ctx.changed(out) or value is None:
        return
    target = value.astype(np.int64).copy()
    old, new = ctx.old_shape(out), ctx.shape(out)
    offset = len(old) - len(target)
    for i in range(len(target)):
        if old[i + offset] != new[i + offset] and target[i] == old[i + offset]:
            target[i] = new[i + offset]
    ctx.set_const_input(1, target)


KINDS = (
    OpKind("Reshape", reshape, rewrite=reshape_target, expands=False),
    OpKind("Flatten", reshape, expands=False),
    OpKind("Squeeze", reshape, expands=False),
    OpKind("Unsqueeze", reshape, expands=False),
    OpKind("Transpose", transpose, expands=False),
    OpKind("Resize", resize, rewrite=resize_sizes, expands=False),
    OpKind("Upsample", resize, expands=False),
    OpKind("Expand", expand, rewrite=expand_shape),
    OpKind("Tile", expand),
    OpKind("DepthToSpace", mixing("moves channels into space"), shapeless=True),
    OpKind("SpaceToDepth", mixing("moves space into channels"), shapeless=True),
)
