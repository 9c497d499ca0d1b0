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


def numel(shape: Shape | None) -> int:
    """Elements of a tensor of known shape; 0 otherwise."""
    if shape is None or any(d < 0 for d in shape):
        return 0
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
    """An op with a weight (input 1) whose multiply-accumulates MorphNet counts."""

    macs: Macs
    sides: Callable[[Node, int, int], tuple[int, int]]
    """Channel axes of input 0 and of output 0, from their ranks."""
    grouping: Callable[[Node, Shape], Grouping] | None = None
    """How the op splits channels into groups, from its weight's shape (None: it never does)."""

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
    shapeless: bool = False
    """The rule reads no shapes (it only stops or names no channels), so it runs even where shape
    inference failed: the user then reads the op's own reason, not "shape unknown"."""
