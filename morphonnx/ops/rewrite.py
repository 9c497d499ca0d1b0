"""What an op's rewrite sees of one node of the model being pruned, and how it edits it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from morphonnx.channels import Channels
from morphonnx.graph import Graph
from morphonnx.ir import Node, Shape


@dataclass
class RewriteContext:
    """One node of the model being rewritten, with old and new tensor shapes."""

    node: Node
    proto: onnx.NodeProto
    model: onnx.ModelProto
    graph: Graph
    channels: Channels
    new_shape: Callable[[str], Shape | None]
    kept: Callable[[str], np.ndarray | None]

    def old_shape(self, tensor: str) -> tuple[int, ...]:
        s = self.graph.shape(tensor)
        assert s is not None
        return s

    def shape(self, tensor: str) -> tuple[int, ...]:
        s = self.new_shape(tensor)
        assert s is not None
        return s

    def changed(self, tensor: str) -> bool:
        """Whether ``tensor`` lost channels; never for a tensor of unknown shape (its rule
        stopped every channel it touches, so nothing about it can change)."""
        old = self.graph.shape(tensor)
        return old is not None and self.new_shape(tensor) != old

    def const_input(self, i: int) -> np.ndarray | None:
        if i >= len(self.proto.input) or not self.proto.input[i]:
            return None
        return self.graph.small_value(self.proto.input[i])

    def bound_input(self, i: int) -> np.ndarray | None:
        """Input ``i`` as a constant, or as computed from channel counts only (Slice bounds of
        torch ``chunk``): its value in the original model."""
        value = self.const_input(i)
        if value is None and i < len(self.proto.input) and self.proto.input[i]:
            value = self.channels.shape_value(self.proto.input[i])
        return value

    def set_const_input(self, i: int, value: np.ndarray) -> None:
        """Point input ``i`` at a new initializer (the old constant may be shared)."""
        name = f"{self.node.name}__pruned_in{i}"
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        while len(self.proto.input) <= i:
            self.proto.input.append("")
        self.proto.input[i] = name

    def set_attr(self, name: str, value: Any) -> None:
        for k, a in enumerate(self.proto.attribute):
            if a.name == name:
                del self.proto.attribute[k]
                break
        self.proto.attribute.append(helper.make_attribute(name, value))
