"""Channel rules for channels seen in blocks: a Reshape that splits the channel axis (attention
heads, channel shuffle, group norm, radix groups), MatMul between two activations (q·kᵀ, ·v) and
GroupNormalization.

Union-find ties whole variables, so one split of C = n x d channels gets one granularity:

* *per position* (the channel axis becomes the inner factor ``d``): channel ``p`` of every block
  is tied, so every block keeps the same positions and the reshape target only changes ``d``
  (per-head dims uniform across heads, a shuffle's ``c``, a radix group's width);
* *whole blocks* (the channel axis becomes the outer factor ``n``): the ``d`` channels of a block
  live or die together, and the target only changes ``n`` (whole groups of a group norm).

Per position is taken when ``d`` is an axis of its own and nothing reading the split takes
statistics over it; whole blocks when the inner factor is merged with the following axes (group
norm's ``[B, G, C/G*H*W]``) or reduced over (group norm written with ReduceMean), where removing
one position would change the statistics of the rest of its block.
"""

from __future__ import annotations

import math

import numpy as np

from morphonnx.channels import RuleContext

ZERO_AT_ZERO = frozenset(
    """Relu LeakyRelu PRelu Tanh Neg Abs Identity Cast CastLike Dropout Sin Sqrt HardSwish Softsign
    Asinh Atan Sinh Tan Elu Selu Celu Mish Sign Floor Ceil Round ThresholdedRelu Gelu Erf Shrink
    Reshape Transpose Flatten Squeeze Unsqueeze Gather Slice Split Expand Tile Resize Upsample
    MaxPool AveragePool GlobalAveragePool GlobalMaxPool ReduceMean ReduceSum ReduceMax""".split()
)
"""Ops whose output is zero on a channel whose input is zero there (f(0) = 0, or moving data)."""


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
    the output, tied with the other side's batch axis when it is not broadcast."""
    a, b = ctx.input(0), ctx.input(1)
    out = ctx.outputs[0]
    ra, rb, r = ctx.rank(a), ctx.rank(b), ctx.rank(out)
    ca, cb = ctx.axis(a), ctx.axis(b)
    if ra < 2 or rb < 2 or (ca is None and cb is None):
        ctx.stop_all(f"MatMul at {ctx.where()} multiplies computed tensors (channels mix)")
        return
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
    oa = None if ca is None else (r - 2 if ca == ra - 2 else ca + r - ra)
    ob = None if cb is None else (r - 1 if cb == rb - 1 else cb + r - rb)
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


def group_norm(ctx: RuleContext) -> None:
    """GroupNormalization: each group's statistics are over all its channels, so a group lives or
    dies whole (removing one channel would change the others' normalization). From opset 21,
    scale and bias have one entry per channel. The opset-18 form (one per group) is deprecated:
    onnx.checker refuses it, so a pruned model could not be checked."""
    x = ctx.input(0)
    if ctx.graph.opset < 21:
        ctx.stop_all(
            f"GroupNormalization at {ctx.where()} is the deprecated opset-18 form (onnx.checker "
            "refuses it); export at opset 21 or as Reshape + InstanceNormalization"
        )
        return
    if ctx.axis(x) not in (None, 1):
        ctx.stop_all(f"GroupNormalization at {ctx.where()} normalizes axis 1, not the channel axis")
        return
    xs = ctx.channels_of(x, 1)
    g, c = int(ctx.node.attr("num_groups", 1)), xs.size
    if g < 1 or c % g:
        ctx.stop_all(f"GroupNormalization at {ctx.where()} has {g} groups of {c} channels")
        return
    block = np.arange(c).reshape(g, c // g)
    ctx.tie(xs, block, xs, block[:, :1])
    ctx.same(xs, ctx.out(ctx.outputs[0], 1))
    for t, role in zip(ctx.inputs[1:3], ("gamma", "beta"), strict=False):
        if ctx.is_const(t) and ctx.rank(t) == 1 and ctx.shape(t)[0] == c:
            ctx.same(xs, ctx.weight(t, 0, role))
        else:
            ctx.stop(xs, f"GroupNormalization at {ctx.where()} has a non-constant parameter `{t}`")


WEIGHT_CHAIN_OPS = frozenset(
    """ReduceMean ReduceSum ReduceSumSquare ReduceL2 ReduceMax ReduceMin Sub Add Mul Div Sqrt Pow
    Reciprocal Neg Abs Identity Cast Max Min""".split()
)
"""Ops a weight may be computed with (standardization) and keep its filters independent."""


def weight_chain(ctx: RuleContext, w: str) -> tuple[list[str], list[str], bool] | None:
    """A weight computed from constants filter by filter (weight standardization: mean and
    variance over the rest of each filter, a per-filter gain): the computed tensors, the
    constants with a slice per filter on axis 0, and whether the statistics span axis 1 (the
    input channels, which then may not be removed). None when it is computed another way."""
    rank, filters = ctx.rank(w), ctx.shape(w)[0]
    tensors: list[str] = []
    consts: list[str] = []
    over_inputs = False
    stack, seen = [w], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if ctx.is_const(t):
            shape = ctx.shape(t)
            if len(shape) == rank and shape[0] == filters:
                consts.append(t)
            elif len(shape) == rank and shape[0] != 1:
                return None
            continue
        node = ctx.graph.producer.get(t)
        if node is None or not node.standard or node.op_type not in WEIGHT_CHAIN_OPS:
            return None
        if ctx.axis(t) is not None or ctx.rank(t) != rank or ctx.shape(t)[0] != filters:
            return None
        tensors.append(t)
        inputs = node.inputs
        if node.op_type.startswith("Reduce"):
            axes = node.attr("axes")
            if axes is None and len(inputs) > 1 and inputs[1]:
                value = ctx.value(inputs[1])
                axes = None if value is None else value.reshape(-1).tolist()
            if axes is None or not node.attr("keepdims", 1):
                return None
            axes = [int(v) % rank for v in axes]
            if 0 in axes:
                return None
            over_inputs = over_inputs or 1 in axes
            inputs = inputs[:1]
        stack.extend(inputs)
    return tensors, consts, over_inputs
