"""Channel variables, the ties between them, and the stops: what the channel rules write into.

Every channel of a tensor's channel axis, and every slice of a weight along an axis that a rule
names, is one integer variable. A *slot* is a run of variables for one (tensor, axis). Rules tie
variables (these channels must live or die together) and stop them (these channels may not be
removed, for a reason a user can read). The group solver turns that into groups.

A tensor whose channels no rule could follow (a graph input, the output of an unsupported op) has
no slot of its own but a *why*; a consumer that needs its channels gets a slot that is stopped with
that why, so nothing unknown is ever assumed to pass channels through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from morphonnx.errors import MorphonnxError
from morphonnx.formats import Attention
from morphonnx.graph import Graph
from morphonnx.ir import Node, Shape
from morphonnx.shapevalue import SHAPE_VALUE_LIMIT, ShapeValues

MAX_CHANNEL_VARIABLES = 50_000_000
"""Channel variables of one model: a 70B-parameter language model has about 30 million (every
channel axis of every activation and weight); the solver needs about 100 bytes per variable."""

Role = Literal["", "producer", "consumer", "gamma", "beta", "stat", "bias", "scale", "const"]
"""What a weight slice is to its channel: ``producer`` (a filter of the layer that makes the
channel), ``consumer`` (the input slice of a layer that reads it), ``gamma`` / ``beta`` / ``stat``
(normalization scale, shift, running statistics), ``bias``, ``scale`` (per-channel constants of
Add/Sub and Mul/Div), ``const`` (any other per-channel constant); ``""`` for activations."""


@dataclass
class Slot:
    """Variables ``base .. base+size-1``: index ``i`` along ``axis`` of ``tensor``."""

    id: int
    tensor: str
    axis: int
    size: int
    base: int
    const: bool
    role: Role = ""

    @property
    def vars(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size)


@dataclass
class Channels:
    """All slots of a graph with their ties and stops."""

    graph: Graph
    slots: list[Slot] = field(default_factory=list)
    by_key: dict[tuple[str, int], Slot] = field(default_factory=dict)
    axis_of: dict[str, int] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    n_vars: int = 0
    ties_a: list[np.ndarray] = field(default_factory=list)
    ties_b: list[np.ndarray] = field(default_factory=list)
    stops: list[tuple[np.ndarray, str]] = field(default_factory=list)
    zero_memo: dict[str, bool] = field(default_factory=dict)  # ops.linear.zero_when_dead
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # ops.layout.constant_target
    attention: Attention = "dims"  # how a split that feeds attention is grouped (ops.layout)

    def slot_for(self, tensor: str, axis: int, *, const: bool, role: Role = "") -> Slot:
        key = (tensor, axis)
        slot = self.by_key.get(key)
        if slot is not None:
            return slot
        shape = self.graph.shape(tensor)
        assert shape is not None and 0 <= axis < len(shape) and shape[axis] >= 0
        self.reserve(tensor, shape[axis])
        slot = Slot(len(self.slots), tensor, axis, shape[axis], self.n_vars, const, role)
        self.n_vars += slot.size
        self.slots.append(slot)
        self.by_key[key] = slot
        if not const:
            self.axis_of[tensor] = axis
        return slot

    def reserve(self, tensor: str, size: int) -> None:
        """Refuse, before anything is allocated, a model whose channel axes add up to more
        variables than any real network has (a tiny file may declare a billion channels)."""
        if self.n_vars + size > MAX_CHANNEL_VARIABLES:
            raise MorphonnxError(
                f"{self.graph.path}: `{tensor}` brings the channel count to "
                f"{self.n_vars + size:,}, over the limit of {MAX_CHANNEL_VARIABLES:,}"
            )

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        self.ties_a.append(a.reshape(-1))
        self.ties_b.append(b.reshape(-1))

    def stop(self, variables: np.ndarray, reason: str) -> None:
        self.stops.append((np.asarray(variables, dtype=np.int64).reshape(-1), reason))

    @cached_property
    def live(self) -> set[str]:
        """Tensors computed from the graph inputs (whose batch or spatial dims may vary); not
        what is computed from their shapes alone (``Shape``, ``Size``: a shape vector's own
        length is the rank, fixed, and torch's ``expand`` takes ``Shape`` of one)."""
        found = set(self.graph.inputs)
        for node in self.graph.nodes:
            if node.standard and node.op_type in ("Shape", "Size"):
                continue
            if any(t in found for t in node.inputs + node.implicit_inputs):
                found.update(node.outputs)
        return found

    def shape_value(self, tensor: str) -> np.ndarray | None:
        """A small integer tensor computed from tensor shapes and constants (the Slice bounds of
        torch ``chunk``: Shape -> Gather -> Add -> Div -> Mul), when it depends on channel
        counts only: those are fixed by the weights, so it has this value in every run, and in
        the pruned model it may be written as a constant. None otherwise (it reads a batch or
        spatial dim, or is not such a computation)."""
        exact = self._values(self.graph.shape).value(tensor)
        if exact is None or exact.dtype.kind not in "iu":
            return None

        live = self.live

        def others_moved(t: str) -> Shape | None:
            shape = self.graph.shape(t)
            if t not in live or shape is None or any(d < 0 for d in shape):
                return shape  # a shape computation's own size (pads) is fixed
            a = self.axis_of.get(t)
            return tuple(d if i == a else 2 * d + 3 for i, d in enumerate(shape))

        moved = self._values(others_moved).value(tensor)
        return exact if moved is not None and np.array_equal(moved, exact) else None

    def shape_dependence(self, tensor: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """A shape computation evaluated three times: at the graph's shapes, with every batch or
        spatial dim moved, and with every dim moved (channels too). An entry equal in all three is
        a constant; one that moves only with the channels depends on channel counts; one that
        moves with the others follows the input at run time. None if it cannot be evaluated."""
        live = self.live

        def moved(channels: bool) -> Callable[[str], Shape | None]:
            def shape_of(t: str) -> Shape | None:
                shape = self.graph.shape(t)
                if t not in live or shape is None or any(d < 0 for d in shape):
                    return shape
                a = None if channels else self.axis_of.get(t)
                return tuple(d if i == a else 2 * d + 3 for i, d in enumerate(shape))

            return shape_of

        values = [
            self._values(f).value(tensor)
            for f in (self.graph.shape, moved(channels=False), moved(channels=True))
        ]
        exact, others, every = values
        if exact is None or others is None or every is None:
            return None
        if exact.dtype.kind not in "iu" or not exact.shape == others.shape == every.shape:
            return None
        return exact, others, every

    def run_time_values(self, tensor: str) -> list[np.ndarray] | None:
        """A small integer tensor computed at run time from shapes (TF "same" pads from the input
        size), at the analyzed shapes and with every dim of the computed tensors moved (batch,
        spatial and channel counts): an entry equal in all of them does not follow the shapes.
        None when it is not such a computation."""
        values = [self.value_at(tensor, self.graph.shape, moved=m) for m in (False, True)]
        if any(v is None or v.dtype.kind not in "iu" for v in values):
            return None
        return [v for v in values if v is not None]

    def value_at(
        self, tensor: str, shapes: Callable[[str], Shape | None], *, moved: bool = False
    ) -> np.ndarray | None:
        """A shape computation's value when tensors have ``shapes`` (the pruned model's); with
        ``moved``, also every dim of the computed tensors moved, to see which entries are fixed."""
        live = self.live

        def shape_of(t: str) -> Shape | None:
            shape = shapes(t)
            if not moved or t not in live or shape is None or any(d < 0 for d in shape):
                return shape
            return tuple(2 * d + 3 for d in shape)

        return self._values(shape_of).value(tensor)

    def _values(self, shape_of: Callable[[str], Shape | None]) -> ShapeValues:
        g = self.graph
        return ShapeValues(lambda t: g.small_value(t, SHAPE_VALUE_LIMIT), g.producer.get, shape_of)


class RuleContext:
    """What a channel rule sees of one node, and the verbs it uses to tie and stop channels."""

    def __init__(self, channels: Channels, node: Node) -> None:
        self.ch = channels
        self.graph = channels.graph
        self.node = node

    # --- reading -----------------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return self.node.inputs

    @property
    def outputs(self) -> list[str]:
        return self.node.outputs

    def input(self, i: int) -> str:
        return self.node.inputs[i] if i < len(self.node.inputs) else ""

    def shape(self, tensor: str) -> tuple[int, ...]:
        s = self.graph.shape(tensor)
        assert s is not None
        return s

    def rank(self, tensor: str) -> int:
        return len(self.shape(tensor))

    def is_const(self, tensor: str) -> bool:
        return self.graph.is_const(tensor)

    def axis(self, tensor: str) -> int | None:
        """The channel axis of an activation, or None when it carries no known channels."""
        return self.ch.axis_of.get(tensor)

    def value(self, tensor: str) -> np.ndarray | None:
        """A small constant's value (axes, shapes, sizes), or None if not a small constant."""
        return self.graph.small_value(tensor) if tensor else None

    def bound(self, tensor: str) -> np.ndarray | None:
        """A constant, or a value computed from channel counts only (``Channels.shape_value``)."""
        if not tensor:
            return None
        v = self.graph.small_value(tensor)
        return v if v is not None else self.ch.shape_value(tensor)

    def where(self) -> str:
        return f"node `{self.node.name}`"

    # --- slots -------------------------------------------------------------------------------
    def out(self, tensor: str, axis: int) -> Slot:
        """Declare ``axis`` the channel axis of an output activation."""
        return self.ch.slot_for(tensor, axis, const=False)

    def weight(self, tensor: str, axis: int, role: Role) -> Slot:
        """The slot of a constant along ``axis`` (a member of the groups it gets tied to)."""
        return self.ch.slot_for(tensor, axis % self.rank(tensor), const=True, role=role)

    def channels_of(self, tensor: str, axis: int) -> Slot:
        """The slot of an input activation on ``axis``; when the tensor's channels are unknown
        here, a slot stopped with the reason (graph input, unsupported producer, ...)."""
        own = self.axis(tensor)
        if own == axis:
            return self.ch.by_key[(tensor, axis)]
        if own is not None:
            slot = self.ch.by_key[(tensor, own)]
            self.stop(
                slot,
                f"{self.node.op_type} at {self.where()} expects channels of `{tensor}` on axis "
                f"{axis}, they are on axis {own}",
            )
            key = (tensor, axis)
            extra = self.ch.by_key.get(key)
            if extra is None:
                self.ch.reserve(tensor, self.shape(tensor)[axis])
                extra = Slot(
                    len(self.ch.slots),
                    tensor,
                    axis,
                    self.shape(tensor)[axis],
                    self.ch.n_vars,
                    False,
                )
                self.ch.n_vars += extra.size
                self.ch.slots.append(extra)
                self.ch.by_key[key] = extra
            self.stop(extra, f"channel axis conflict at {self.where()}")
            return extra
        slot = self.ch.slot_for(tensor, axis, const=False)
        self.ch.stop(slot.vars, self.ch.why.get(tensor, f"channels of `{tensor}` are not known"))
        return slot

    # --- ties and stops ------------------------------------------------------------------------
    def same(self, a: Slot, b: Slot) -> None:
        """Channel i of ``a`` is channel i of ``b``; a model where their counts differ (a conv
        whose weight disagrees with its input) cannot run, and is refused."""
        if a.size != b.size:
            raise MorphonnxError(
                f"{self.graph.path}: {self.node.op_type} at {self.where()}: `{a.tensor}` has "
                f"{a.size} channels on axis {a.axis}, `{b.tensor}` has {b.size} on axis {b.axis}"
            )
        self.ch.tie(a.vars, b.vars)

    def tie(self, a: Slot, ia: np.ndarray, b: Slot, ib: np.ndarray) -> None:
        """Variables ``a[ia]`` and ``b[ib]`` (broadcast together) live or die together."""
        self.ch.tie(a.base + np.asarray(ia), b.base + np.asarray(ib))

    def stop(self, slot: Slot, reason: str, index: np.ndarray | None = None) -> None:
        v = slot.vars if index is None else slot.base + np.asarray(index)
        self.ch.stop(v, reason)

    def no_channels(self, reason: str, outputs: list[str] | None = None) -> None:
        """The outputs carry no channels a rule can follow; consumers learn why."""
        for t in self.outputs if outputs is None else outputs:
            if t and t not in self.ch.axis_of:
                self.ch.why.setdefault(t, reason)

    def stop_all(self, reason: str) -> None:
        """Channels may not cross this node: stop every input that carries channels."""
        for t in dict.fromkeys(self.inputs + self.node.implicit_inputs):
            a = self.axis(t) if t else None
            if a is not None:
                self.stop(self.ch.by_key[(t, a)], reason)
        self.no_channels(reason)

    def inherit_why(self) -> str:
        for t in self.inputs:
            if t in self.ch.why:
                return self.ch.why[t]
        return f"output of {self.node.op_type} at {self.where()}"
