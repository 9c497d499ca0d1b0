"""What morphonnx knows about one op kind: the record each op-family module fills in."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from morphonnx.channels import RuleContext
from morphonnx.ir import Node, Shape
from morphonnx.ops.rewrite import RewriteContext

ShapeOf = Callable[[str], Shape | None]
ChannelRule = Callable[[RuleContext], None]
Rewrite = Callable[[RewriteContext], None]
Macs = Callable[[Node, Shape, Shape, Shape], int]
"""MACs from the shapes of input 0, the weight and output 0 (no bias)."""


def numel(shape: Shape) -> int:
    """Elements of a tensor of known shape (an unknown size is never 0: ``costs`` calls the
    MACs functions only with known shapes)."""
    if any(d < 0 for d in shape):
        raise ValueError(f"numel of a shape with unknown dims {shape}")
    return math.prod(shape)


@dataclass(frozen=True)
class Grouping:
    """How a (transposed) convolution splits its channels into ``groups``."""

    groups: int
    in_per_group: int
    out_per_group: int

    @property
    def depthwise(self) -> bool:
        """One input channel per group: input channel i feeds only its own outputs."""
        return self.groups > 1 and self.in_per_group == 1


@dataclass(frozen=True)
class Layer:
    """An op with a weight (input 1) whose multiply-accumulates MorphNet counts; linear in its
    input 0."""

    macs: Macs
    sides: Callable[[Node, int, int], tuple[int, int]]
    """Channel axes of input 0 and of output 0, from their ranks."""
    grouping: Callable[[Node, Shape], Grouping] | None = None
    """How the op splits channels into groups, from its weight's shape (None: it never does)."""
    bias: int | None = None
    """The input holding a bias added per output channel (None: the op has none)."""

    def depthwise(self, node: Node, weight: Shape) -> bool:
        return self.grouping is not None and self.grouping(node, weight).depthwise


@dataclass(frozen=True)
class OpKind:
    """Everything about one ONNX op type: its channel rule and what pruning and costs need."""

    op_type: str
    channels: ChannelRule
    """Ties and stops the channels of one node (see ``morphonnx.channels.RuleContext``)."""
    rewrite: Rewrite | None = None
    """Fixes attributes or constant inputs after channels were removed (``group``, targets)."""
    layer: Layer | None = None
    per_channel: bool = False
    """Reads constants as per-channel parameters (biases, scales, norm statistics): a constant
    shared by several such readers is given to each its own copy."""
    expands: bool = True
    """Can enlarge a deviation of its inputs (False: |f'| <= 1 or moving data); verification
    measures a non-expanding op's outputs at its inputs' scale."""
    divisors: tuple[int, ...] = ()
    """Inputs it divides by: in verification's zeroed reference a dead channel's divisor is set
    to one, so the dead channel is zero rather than the NaN of 0 / 0."""
    drops_channels: bool = False
    """Input channels its outputs do not carry are not read (Shape and Size read only shapes;
    Slice, Split and Gather drop what they do not select): a dead channel's constant may stop
    there without being folded anywhere (``prune --fold-constants``)."""
    shapeless: bool = False
    """The rule reads no shapes (it only stops or names no channels), so it runs even where shape
    inference failed: the user then reads the op's own reason, not "shape unknown"."""
