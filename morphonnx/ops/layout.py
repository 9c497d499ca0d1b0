"""Layout ops: the data keeps its values but changes shape, order or repetition.

A Reshape that splits the channel axis C = n x d into blocks gets one granularity, as union-find
ties whole variables: *per position* (the channel axis becomes the inner factor ``d``: channel p
of every block is tied, every block keeps the same positions and only ``d`` shrinks in the
target: channel shuffle, per-head dims, radix groups) or *whole blocks* (the outer factor ``n``:
a block lives or dies whole: group norm). Per position is taken when ``d`` is an axis of its own
and nothing reading the split takes statistics over it; whole blocks when the inner factor is
merged with the following axes (``[B, G, C/G*H*W]``) or reduced over, where removing one position
would change the statistics of the rest of its block.
"""

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
        split = choose_split(ctx, x, a)
        if split is not None and split_reshape(ctx, x, a, split):
            return
        how = " by a target computed at run time" if split is not None else ""
        mixes(ctx, f"splits the channel axis of `{x}` ({ctx.shape(x)} -> {ctx.shape(out)}){how}")
        return
    b, pos = found
    if ctx.node.op_type == "Reshape":  # a target from shapes that the rewrite must write
        constant_target(ctx, x, a, b)
    ctx.tie(ctx.ch.by_key[(x, a)], np.arange(pos.shape[0])[:, None], ctx.out(out, b), pos)


def split_map(
    in_shape: tuple[int, ...], a: int, out_shape: tuple[int, ...], *, blocks: bool = False
) -> tuple[int, np.ndarray] | None:
    """Where channel axis ``a`` goes when a Reshape splits it into blocks: the output axis and,
    per index along it, the input channels it stands for (one per block, or a block's ``d``).

    Per position when an output axis is the inner factor on its own (unless ``blocks``), else
    whole blocks when an output axis is the outer factor; None when the channels spread in
    another way."""
    c = in_shape[a]
    outer = math.prod(in_shape[:a])
    inner = math.prod(in_shape[a + 1 :])
    for b in [] if blocks else reversed(range(len(out_shape))):
        d = out_shape[b]
        if 1 < d < c and not c % d:
            before, after = math.prod(out_shape[:b]), math.prod(out_shape[b + 1 :])
            if before == outer * (c // d) and after == inner:  # per position
                return b, np.arange(d)[:, None] + d * np.arange(c // d)[None, :]
    for b, d in enumerate(out_shape):
        if 1 < d < c and not c % d:
            before, after = math.prod(out_shape[:b]), math.prod(out_shape[b + 1 :])
            if before == outer and after == (c // d) * inner:  # whole blocks
                return b, np.arange(d)[:, None] * (c // d) + np.arange(c // d)[None, :]
    return None


def choose_split(ctx: RuleContext, x: str, a: int) -> tuple[int, np.ndarray] | None:
    """``split_map`` per position, or whole blocks when what reads the split takes statistics
    over the positions within a block (group norm written with reductions, as Keras does)."""
    in_shape, out = ctx.shape(x), ctx.outputs[0]
    found = split_map(in_shape, a, ctx.shape(out))
    if found is not None and _statistics_over(ctx, out, found[0]):
        return split_map(in_shape, a, ctx.shape(out), blocks=True) or found
    return found


def _statistics_over(ctx: RuleContext, tensor: str, axis: int) -> bool:
    """Whether a reader of ``tensor`` reduces or normalizes over ``axis``."""
    rank = ctx.rank(tensor)
    for node in ctx.graph.consumers.get(tensor, []):
        if not node.standard or node.inputs[:1] != [tensor]:
            continue
        op = node.op_type
        if op.startswith("Reduce"):
            axes = node.attr("axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1]:
                value = ctx.value(node.inputs[1])
                axes = None if value is None else value.reshape(-1).tolist()
            if axes is None or axis in [int(v) % rank for v in axes]:
                return True
        elif op == "InstanceNormalization" and axis >= 2:
            return True
        elif op == "LayerNormalization" and axis >= int(node.attr("axis", -1)) % rank:
            return True
        elif op == "MeanVarianceNormalization":
            if axis in [int(v) % rank for v in node.attr("axes", [0, 2, 3])]:
                return True
    return False


def split_reshape(ctx: RuleContext, x: str, a: int, found: tuple[int, np.ndarray]) -> bool:
    """Tie the input channels of a splitting Reshape to the output axis ``split_map`` found.
    The pruned target must be written as a constant (False: it cannot, not followed)."""
    b, pos = found
    if ctx.node.op_type != "Reshape" or not constant_target(ctx, x, a, b):
        return False
    ctx.tie(ctx.ch.by_key[(x, a)], pos, ctx.out(ctx.outputs[0], b), np.arange(len(pos))[:, None])
    return True


def constant_target(ctx: RuleContext, x: str, a: int, b: int) -> bool:
    """Whether the Reshape's target is a constant, or computed at run time in a way the rewrite
    can write as one (recorded in ``Channels.targets``): entries that are constants stay, the
    entry of the channel axis ``b`` gets the pruned count (torch reads it from another tensor's
    shape, which pruning does not change), an entry that follows a batch or spatial dim becomes
    0 (the input's dim at the same index) or the one -1."""
    node = ctx.node
    if "shape" in node.attrs or ctx.value(ctx.input(1)) is not None:
        return True
    dep = ctx.ch.shape_dependence(ctx.input(1))
    if dep is None or node.attr("allowzero", 0):
        return False
    exact, others, every = (v.reshape(-1).astype(np.int64) for v in dep)
    in_shape, out_shape = ctx.shape(x), ctx.shape(ctx.outputs[0])
    if len(exact) != len(out_shape):
        return False
    template = exact.copy()
    for i in range(len(exact)):
        if exact[i] == others[i] == every[i]:
            continue  # a constant
        if exact[i] == others[i]:  # follows channel counts: only the channel axis may
            if i != b:
                return False
            template[i] = out_shape[i]
        elif i == b:
            return False
        elif i < len(in_shape) and i != a and others[i] == 2 * in_shape[i] + 3:
            template[i] = 0
        else:
            template[i] = -1
    if (template == -1).sum() > 1:
        return False
    ctx.ch.targets[node.name] = template
    return True


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
        if value is None:  # computed from shapes: if it does not follow the pruned shapes by
            if _follows(ctx):  # itself (torch reads a width from another tensor), it is
                return  # written as the constant the rule made of it
            value = ctx.channels.targets.get(ctx.node.name)
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


def _follows(ctx: RewriteContext) -> bool:
    """Whether the computed target, evaluated on the pruned shapes, gives the pruned output."""
    target = ctx.channels.value_at(ctx.node.inputs[1], ctx.new_shape)
    x_shape = ctx.new_shape(ctx.node.inputs[0])
    if target is None or x_shape is None:
        return False
    allowzero = bool(ctx.node.attr("allowzero", 0))
    return reshaped(x_shape, target.reshape(-1), allowzero) == ctx.shape(ctx.node.outputs[0])


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
