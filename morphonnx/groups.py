"""The group solver: union-find over channel variables, then channels that share slots are a group.

After the rules tie variables, each connected class is one prunable unit: a channel of a producing
layer together with every slice of every weight and activation that must go with it. Classes that
touch exactly the same slots form one *group* (the 64 filters of a conv and everything downstream of
them); a group is prunable when none of its classes is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from morphonnx.channels import Channels, Role, RuleContext, Slot
from morphonnx.formats import Attention
from morphonnx.graph import Graph
from morphonnx.ops import op_kind
from morphonnx.unverifiable import stop_unverifiable


def build_channels(graph: Graph, attention: Attention = "dims") -> Channels:
    """Run every node's channel rule in topological order and stop what touches graph inputs and
    outputs."""
    ch = Channels(graph, attention=attention)
    for name in graph.inputs:
        ch.why[name] = f"graph input `{name}`"
    for node in graph.nodes:
        ctx = RuleContext(ch, node)
        kind = op_kind(node)
        used = [t for t in node.outputs if t in graph.consumers or t in graph.outputs]
        unknown = [t for t in node.inputs + used if t and not graph.info(t).known]
        if unknown and not kind.shapeless:
            # name the cause where one is known (the unsupported op upstream), not its symptom
            why = ch.why.get(unknown[0])
            ctx.stop_all(why or f"shape of `{unknown[0]}` unknown at {ctx.where()}")
            continue
        if node.inputs and all(graph.is_const(t) for t in node.inputs + node.implicit_inputs if t):
            # (an If/Loop/Scan whose subgraphs read an activation computes no constant)
            ctx.no_channels(f"constant computed at {ctx.where()}")
            continue
        kind.channels(ctx)
        ctx.no_channels(ctx.inherit_why())
    for name in graph.outputs:
        a = ch.axis_of.get(name)
        if a is not None:
            ch.stop(ch.by_key[(name, a)].vars, f"graph output `{name}`")
    stop_unverifiable(ch)
    return ch


@dataclass
class Member:
    """The slices of one tensor along ``axis`` that belong to each channel of a group."""

    tensor: str
    axis: int
    role: Role
    index: np.ndarray = field(repr=False)  # the slices of channel 0, then of channel 1, ...
    counts: np.ndarray = field(repr=False)  # how many slices each channel has

    @cached_property
    def positions(self) -> list[list[int]]:
        """``positions[k]``: the indices along ``axis`` that belong to channel ``k``."""
        if len(self.counts) and (self.counts == self.counts[0]).all():
            return self.index.reshape(len(self.counts), -1).tolist()
        return [p.tolist() for p in np.split(self.index, np.cumsum(self.counts)[:-1])]


@dataclass
class Group:
    id: str
    channels: int
    prunable: bool
    reasons: list[str]
    members: list[Member]  # constants: weights, biases, norm parameters, per-channel constants
    activations: list[Member]  # computed tensors whose channel axis carries the group
    labels: np.ndarray = field(repr=False)  # class label of each channel

    @property
    def reason(self) -> str | None:
        if self.prunable:
            return None
        shown = self.reasons[:3]
        more = f" (+{len(self.reasons) - 3} more)" if len(self.reasons) > 3 else ""
        return "; ".join(shown) + more


@dataclass
class Solution:
    """Groups of a graph, plus the variable labels that map any slot back to its groups."""

    graph: Graph
    channels: Channels
    groups: list[Group]
    labels: np.ndarray

    def group(self, gid: str) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    def slot_labels(self, slot: Slot) -> np.ndarray:
        return self.labels[slot.base : slot.base + slot.size]

    def kept(self, slot: Slot, dead: np.ndarray) -> np.ndarray:
        """Indices along ``slot`` that survive when classes ``dead`` (bool per label) die."""
        return np.flatnonzero(~dead[self.slot_labels(slot)])

    def lost(self, dead: np.ndarray) -> np.ndarray:
        """How many variables of each slot die when classes ``dead`` (bool per label) die."""
        slots = self.channels.slots
        ends = np.concatenate([[0], np.cumsum(dead[self.labels])])
        base = np.array([s.base for s in slots], dtype=np.int64)
        size = np.array([s.size for s in slots], dtype=np.int64)
        return ends[base + size] - ends[base]

    def dead_labels(self, mask: dict[str, list[bool]]) -> np.ndarray:
        dead = np.zeros(self.channels.n_vars, dtype=bool)
        for g in self.groups:
            keep = mask.get(g.id)
            if keep is not None:
                dead[g.labels[~np.asarray(keep, dtype=bool)]] = True
        return dead


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` variables under edges (a[i], b[i]): the smallest id of each
    component, by min-label hooking with pointer jumping (vectorized, a few rounds)."""
    parent = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        pa, pb = pa[differ], pb[differ]
        low = np.minimum(pa, pb)
        np.minimum.at(parent, pa, low)
        np.minimum.at(parent, pb, low)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


def solve(graph: Graph, attention: Attention = "dims") -> Solution:
    """Channel groups of ``graph``, in a deterministic order (ids ``g0``, ``g1``, ...), with
    attention heads grouped as ``attention`` says."""
    ch = build_channels(graph, attention)
    n = ch.n_vars
    a = np.concatenate(ch.ties_a) if ch.ties_a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(ch.ties_b) if ch.ties_b else np.zeros(0, dtype=np.int64)
    labels = components(n, a, b)
    if n == 0:
        return Solution(graph, ch, [], labels)
    sizes = np.array([s.size for s in ch.slots], dtype=np.int64)
    slot_of = np.repeat(np.arange(len(ch.slots)), sizes)
    is_const = np.array([s.const for s in ch.slots], dtype=bool)

    # a class's signature: the set of slots it touches (hashed by summing random slot keys)
    pair = np.sort(labels * len(ch.slots) + slot_of)
    pair = pair[np.diff(pair, prepend=-1) != 0]
    pair_label, pair_slot = pair // len(ch.slots), pair % len(ch.slots)
    keys = np.random.default_rng(0).integers(1, 2**62, size=len(ch.slots), dtype=np.int64)
    sig = np.zeros(n, dtype=np.uint64)
    np.add.at(sig, pair_label, keys[pair_slot].astype(np.uint64))
    has_const = np.zeros(n, dtype=bool)
    has_const[pair_label[is_const[pair_slot]]] = True

    roots = np.flatnonzero((labels == np.arange(n)) & has_const)  # one per reported class
    stopped: dict[int, list[str]] = {}
    for variables, reason in ch.stops:
        for lab in np.unique(labels[variables]).tolist():
            lst = stopped.setdefault(lab, [])
            if reason not in lst:
                lst.append(reason)

    by_sig: dict[int, list[int]] = {}
    for r in roots.tolist():  # roots ascend, so channels come in order of first appearance
        by_sig.setdefault(int(sig[r]), []).append(r)
    ordered = sorted(by_sig.values(), key=lambda m: m[0])

    group_of = np.full(n, -1, dtype=np.int64)
    channel_of = np.zeros(n, dtype=np.int64)
    for gi, members in enumerate(ordered):
        group_of[members] = gi
        channel_of[members] = np.arange(len(members))
    v = np.flatnonzero(group_of[labels] >= 0)
    gv, kv, sv = group_of[labels[v]], channel_of[labels[v]], slot_of[v]
    pv = v - np.array([s.base for s in ch.slots], dtype=np.int64)[sv]
    idx = np.lexsort((pv, kv, sv, gv))
    gv, kv, sv, pv = gv[idx], kv[idx], sv[idx], pv[idx]
    run = np.flatnonzero(np.diff(gv * len(ch.slots) + sv, prepend=-1, append=-1))

    parts: dict[int, tuple[list[Member], list[Member]]] = {
        gi: ([], []) for gi in range(len(ordered))
    }
    for lo, hi in zip(run[:-1].tolist(), run[1:].tolist(), strict=True):
        gi, slot = int(gv[lo]), ch.slots[int(sv[lo])]
        counts = np.bincount(kv[lo:hi], minlength=len(ordered[gi]))
        member = Member(slot.tensor, slot.axis, slot.role, pv[lo:hi], counts)
        parts[gi][0 if slot.const else 1].append(member)

    groups: list[Group] = []
    for gi, members in enumerate(ordered):
        reasons: list[str] = []
        for r in members:
            for reason in stopped.get(r, []):
                if reason not in reasons:
                    reasons.append(reason)
        groups.append(
            Group(
                id=f"g{gi}",
                channels=len(members),
                prunable=not reasons,
                reasons=reasons,
                members=parts[gi][0],
                activations=parts[gi][1],
                labels=np.array(members, dtype=np.int64),
            )
        )
    return Solution(graph, ch, groups, labels)
