"""Layout ops: the data keeps its values but changes shape, order or repetition.

A Reshape that splits the channel axis C = n x d into blocks gets one granularity, as union-find
ties whole variables: *per position* (the channel axis becomes the inner factor ``d``: channel p
of every block is tied, every block keeps the same positions and only ``d`` shrinks in the
target: channel shuffle, per-head dims, radix groups) or *whole blocks* (the outer factor ``n``:
a block lives or dies whole: group norm). Per position is taken when ``d`` is an axis of its own
and nothing reading the split takes statistics over it; whole blocks when the inner factor is
merged with the following axes (``[B, G, C/G*H*W]``) or reduced over, where removing one position
would change the statistics of the rest of its block. With ``attention="heads"`` (an analysis
option), a split whose head axis reaches attention's MatMuls as a batch axis takes *whole heads*:
the factor just above the head dim, each head with all of its dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from onnx import helper, numpy_helper

from morphonnx.channels import Channels, RuleContext
from morphonnx.ir import Node
from morphonnx.ops.common import follows_input, mixes, mixing, passthrough
from morphonnx.ops.kind import OpKind
from morphonnx.ops.normalization import normalized_from
from morphonnx.ops.rewrite import RewriteContext

Granularity = Literal["positions", "blocks", "heads"]
"""Which factor of a split channel axis the channels follow (:func:`split_map`)."""


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
    in_shape: tuple[int, ...], a: int, out_shape: tuple[int, ...], granularity: Granularity
) -> tuple[int, np.ndarray] | None:
    """Where channel axis ``a`` goes when a Reshape splits it into factors ``n x d x i`` (one
    factor per output axis): the output axis of ``d`` and, per index ``j`` along it, the input
    channels it stands for (``(ch // i) % d == j``). ``positions``: the innermost factor
    (``i = 1``); ``blocks``: the outermost (``n = 1``, else the innermost); ``heads``: the factor
    just above the innermost one (``[3, H, D]`` or ``[H, D]``: H). None when the channels spread
    in another way."""
    c = in_shape[a]
    outer = math.prod(in_shape[:a])
    inner = math.prod(in_shape[a + 1 :])
    factors = {}  # output axis -> (n, i) of the factor it holds
    for b, d in enumerate(out_shape):
        before, after = math.prod(out_shape[:b]), math.prod(out_shape[b + 1 :])
        if 1 < d < c and not c % d and not before % outer and not after % inner:
            if (before // outer) * d * (after // inner) == c:
                factors[b] = (before // outer, after // inner)
    innermost = [b for b, (_, i) in factors.items() if i == 1]
    if granularity == "heads":
        d = out_shape[innermost[0]] if innermost else 0
        chosen = [b for b, (_, i) in factors.items() if i == d]
    elif granularity == "blocks":
        chosen = [b for b, (n, _) in factors.items() if n == 1] or innermost
    else:
        chosen = innermost or [b for b, (n, _) in factors.items() if n == 1]
    if not chosen:
        return None
    b = chosen[0]
    n, i = factors[b]
    d = out_shape[b]
    return b, np.arange(c).reshape(n, d, i).transpose(1, 0, 2).reshape(d, n * i)


def choose_split(ctx: RuleContext, x: str, a: int) -> tuple[int, np.ndarray] | None:
    """``split_map`` per position, or whole blocks when what reads the split takes statistics
    over the positions within a block (group norm written with reductions, as Keras does);
    whole heads when the analysis asks for them (``Channels.attention``) and the split feeds
    attention (:func:`_heads_reach_attention`)."""
    in_shape, out = ctx.shape(x), ctx.outputs[0]
    out_shape = ctx.shape(out)
    if ctx.ch.attention == "heads":
        heads = split_map(in_shape, a, out_shape, "heads")
        if heads is not None and _heads_reach_attention(ctx, out, heads[0]):
            if not _statistics_over(ctx, out, heads[0]):
                return heads
    found = split_map(in_shape, a, out_shape, "positions")
    if found is not None and _statistics_over(ctx, out, found[0]):
        return split_map(in_shape, a, out_shape, "blocks")
    return found


def _heads_reach_attention(ctx: RuleContext, tensor: str, axis: int) -> bool:
    """Whether ``axis`` of ``tensor`` arrives at a MatMul of two computed tensors (q·kᵀ, ·v) as
    a batch axis, through ops that move it (Transpose, reshapes that keep it whole, a Gather of
    another axis) or keep it (scaling, rotary embeddings, norms over other axes): then its
    blocks are attention heads. An axis that is gathered, split or sliced on picks q, k or v,
    and is not one."""
    todo, seen = [(tensor, axis)], set[tuple[str, int]]()
    while todo and len(seen) < 64:
        t, a = todo.pop()
        if (t, a) in seen:
            continue
        seen.add((t, a))
        for node in ctx.graph.consumers.get(t, []):
            if not node.standard or node.inputs[:1] != [t] and node.op_type not in _ANY_INPUT:
                continue
            if node.op_type == "MatMul" and not any(ctx.is_const(i) for i in node.inputs):
                if a < ctx.rank(t) - 2:
                    return True
                continue
            moved = _head_axis_after(ctx, node, t, a)
            if moved is not None:
                todo.append(moved)
    return False


def _head_axis_after(ctx: RuleContext, node: Node, t: str, a: int) -> tuple[str, int] | None:
    """Where axis ``a`` of ``t`` is in ``node``'s output, if the node carries it whole."""
    op, out = node.op_type, node.outputs[0]
    if not out or ctx.graph.shape(out) is None or ctx.graph.shape(t) is None:
        return None
    shape, out_shape = ctx.shape(t), ctx.shape(out)
    if op == "Transpose":
        perm = node.attr("perm") or list(reversed(range(len(shape))))
        return out, list(perm).index(a)
    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        found = reshape_map(shape, a, out_shape)
        return None if found is None else (out, found[0])
    if op == "Gather":
        g = int(node.attr("axis", 0)) % len(shape)
        if g == a:
            return None
        return out, a + (len(out_shape) - len(shape) if a > g else 0)
    first = normalized_from(node, len(shape))
    if first is not None and a >= first:
        return None
    if op not in _KEEPS_HEADS:
        return None
    b = a + len(out_shape) - len(shape)
    return (out, b) if out_shape[b] == shape[a] else None


_ANY_INPUT = frozenset("MatMul Mul Div Add Sub Concat".split())
"""Ops that may read the heads on any input (others: on input 0)."""
_KEEPS_HEADS = frozenset(
    """Split Slice Concat Expand Mul Div Add Sub Neg Cast Identity LayerNormalization
    RMSNormalization""".split()
)
"""Ops that may stand between a head split and attention's MatMuls with each head's data on
the same axis (scaling, rotary embeddings, per-head norms); a cut of that axis (Split, Slice,
Concat along it) changes its size and ends the walk."""


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
        elif (first := normalized_from(node, rank)) is not None and axis >= first:
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
    can write as one (:func:`run_time_template`, kept in ``Channels.targets``)."""
    node = ctx.node
    if "shape" in node.attrs or ctx.value(ctx.input(1)) is not None:
        return True
    template = run_time_template(ctx.ch, node, ctx.shape(x), ctx.shape(ctx.outputs[0]), a, b)
    if template is None:
        return False
    ctx.ch.targets[node.name] = template
    return True


def run_time_template(
    ch: Channels,
    node: Node,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    a: int | None,
    b: int | None,
) -> np.ndarray | None:
    """A Reshape target computed from shapes, as the constant the rewrite writes: entries that
    are constants stay, the entry of the channel axis ``b`` gets the pruned count (torch reads
    it from another tensor's shape, which pruning does not change; with ``b`` None, for an
    output that keeps its shape, every entry that follows channel counts keeps its value), an
    entry that follows a batch or spatial dim becomes 0 (the input's dim at the same index) or
    the one -1. None when it cannot be written so."""
    dep = ch.shape_dependence(node.inputs[1])
    if dep is None or node.attr("allowzero", 0):
        return None
    exact, others, every = (v.reshape(-1).astype(np.int64) for v in dep)
    if len(exact) != len(out_shape):
        return None
    template = exact.copy()
    for i in range(len(exact)):
        if exact[i] == others[i] == every[i]:
            continue  # a constant
        if exact[i] == others[i]:  # follows channel counts: only the channel axis may
            if b is not None and i != b:
                return None
            template[i] = out_shape[i]
        elif i == b:
            return None
        elif i < len(in_shape) and i != a and others[i] == 2 * in_shape[i] + 3:
            template[i] = 0
        else:
            template[i] = -1
    return None if (template == -1).sum() > 1 else template


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
    """A constant target gets the pruned counts where the output changes; one computed from
    shapes is rewritten wherever it does not follow the pruned shapes by itself, even when the
    output keeps its shape (torch's ``unflatten(-1, (3, E))`` reads E from another tensor)."""
    out = ctx.node.outputs[0]
    computed = "shape" not in ctx.node.attrs and ctx.const_input(1) is None
    if ctx.graph.shape(out) is None or not (computed or ctx.changed(out)):
        return
    if "shape" in ctx.node.attrs:  # opset < 5
        target = np.array(ctx.node.attr("shape"), dtype=np.int64)
    else:
        value = ctx.const_input(1)
        if value is None:  # computed from shapes: if it does not follow the pruned shapes by
            if _follows(ctx):  # itself (torch reads a width from another tensor), it is
                return  # written as the constant the rule made of it
            value = ctx.channels.targets.get(ctx.node.name)
            if value is None and not ctx.changed(out):
                x, old = ctx.node.inputs[0], ctx.old_shape(out)
                value = run_time_template(ctx.channels, ctx.node, ctx.old_shape(x), old, None, None)
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
    """A Reshape target computed at run time that does not follow the pruned shapes by itself
    (:func:`fix_run_time_shape`)."""
    x = ctx.node.inputs[0]
    allowzero = bool(ctx.node.attr("allowzero", 0))
    fix_run_time_shape(ctx, lambda target: reshaped(ctx.shape(x), target, allowzero))


def fix_run_time_shape(
    ctx: RewriteContext, result: Callable[[np.ndarray], tuple[int, ...]]
) -> None:
    """A shape input (input 1: a Reshape target, an Expand shape) computed at run time follows
    the pruned shapes where it reads them (``Shape`` of the input), not where it holds a
    channel count as a constant (keras ``Tensordot``: ``Concat(Gather(Shape(x)), [4C])``,
    paddle heads: ``[Shape(x)[0], C]``, ``expand(b, h, r, n, d)``) or reads one from another
    tensor (torch's ``E // num_heads`` from the query's width). Entries that come out wrong at
    the pruned shapes (``result`` of the value: the output shape it gives) and follow no batch
    or spatial dim get the pruned output's dim, by a ``Mul`` (zeroing them) and an ``Add``
    inserted before the node."""
    shape, out = ctx.proto.input[1], ctx.node.outputs[0]
    value = ctx.channels.value_at(shape, ctx.new_shape)
    dep = ctx.channels.shape_dependence(shape)
    if value is None or dep is None or value.dtype.kind not in "iu":
        return  # not evaluable: analyze's dry run reports the group
    value = value.reshape(-1).astype(np.int64)
    exact, others = dep[0].reshape(-1), dep[1].reshape(-1)
    want = ctx.shape(out)
    got = result(value)
    if got == want or len(value) != len(want):
        return
    wrong = np.array(
        [
            g != w and value[i] > 0 and exact[i] == others[i]
            for i, (g, w) in enumerate(zip(got, want, strict=True))
        ]
    )
    if wrong.any():
        name = f"{ctx.node.name}__pruned_shape"
        keep = numpy_helper.from_array((~wrong).astype(np.int64), f"{name}_keep")
        fixed = numpy_helper.from_array(np.where(wrong, want, 0).astype(np.int64), f"{name}_dims")
        ctx.model.graph.initializer.extend([keep, fixed])
        ctx.insert(helper.make_node("Mul", [shape, keep.name], [f"{name}_kept"], f"{name}_mul"))
        ctx.insert(helper.make_node("Add", [f"{name}_kept", fixed.name], [name], f"{name}_add"))
        ctx.proto.input[1] = name


def reshaped(shape: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...]:
    """The output shape of ``Reshape(x of shape, target)``."""
    dims = [shape[i] if d == 0 and not allowzero else int(d) for i, d in enumerate(target)]
    if -1 in dims:
        rest = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(shape) // rest if rest else 0
    return tuple(dims)


def broadcast(shape: tuple[int, ...], target: np.ndarray) -> tuple[int, ...]:
    """The output shape of ``Expand(x of shape, target)``; -1 where they do not broadcast."""
    rank = max(len(shape), len(target))
    a = (1,) * (rank - len(shape)) + tuple(shape)
    b = (1,) * (rank - len(target)) + tuple(int(d) for d in target)
    return tuple(p if q == 1 else q if p in (1, q) else -1 for p, q in zip(a, b, strict=True))


def resize_sizes(ctx: RewriteContext) -> None:
    out = ctx.node.outputs[0]
    if ctx.changed(out) and ctx.const_input(3) is not None:
        ctx.set_const_input(3, np.array(ctx.shape(out), dtype=np.int64))


def expand_shape(ctx: RewriteContext) -> None:
    out = ctx.node.outputs[0]
    value = ctx.const_input(1)
    if not ctx.changed(out):
        return
    if value is None:
        x = ctx.node.inputs[0]
        fix_run_time_shape(ctx, lambda shape: broadcast(ctx.shape(x), shape))
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
