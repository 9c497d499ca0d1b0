"""A group spec bound to a training framework's own parameters (with :mod:`morphonnx.adapterbase`,
the framework-neutral half of every training adapter).

An adapter names, for each spec tensor it can find in its model, the framework's parameter: its
shape in the framework's layout and the axis map between the two layouts (ONNX axis ``a`` is
framework axis ``perm[a]``: Keras kernels are HWIO, torch's equal ONNX's). Here, once: option
checks, shape checks, the regularization plan (every group's vector from a few gathers, see
:class:`Binding`, evaluated with the framework's :class:`~morphonnx.regularize.ArrayOps`),
MorphNet's loss coefficients per set of alive counts, and the dead slices of a mask in the
framework's layout. The adapter keeps export, tensor ops and stage 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np

from morphonnx.devices import Device, resolve_device
from morphonnx.formats import MASK_FORMAT, file_attention, read_mask, recorded_attention
from morphonnx.regularize import (
    COSTS,
    KINDS,
    NUMPY,
    ArrayOps,
    cost_and_coefficients,
    filter_norm,
    select_groups,
)
from morphonnx.spec import read_spec

Stat = Literal["abs", "norm"]


@dataclass(frozen=True)
class Options:
    """Validated regularizer options (see the adapters' ``Regularizer``)."""

    kind: str
    cost: str
    threshold: float
    device: Device | None
    l1_fraction: float
    exclude: tuple[str, ...]


def check_options(
    kind: str,
    cost: str,
    threshold: float,
    device: str | os.PathLike[str] | Device | None,
    l1_fraction: float,
    exclude: str | Sequence[str],
) -> Options:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if not 0.0 <= l1_fraction <= 1.0:
        raise ValueError(f"l1_fraction must be within 0..1, got {l1_fraction}")
    if isinstance(device, (str, os.PathLike)):
        device = resolve_device(os.fspath(device))
    elif device is not None and not isinstance(device, Device):
        raise TypeError("device must be a name, a profile path or a morphonnx Device")
    if cost == "latency" and device is None:
        raise ValueError("cost='latency' needs device= (e.g. 'V100' or a profile file)")
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return Options(kind, cost, float(threshold), device, float(l1_fraction), patterns)


def load_spec(
    spec: str | os.PathLike[str] | dict[str, Any], fingerprint: str | None = None, what: str = ""
) -> tuple[dict[str, Any], str]:
    """(spec, where it came from); with ``fingerprint`` (of ``what``), refuse another model's."""
    where = "spec" if isinstance(spec, dict) else os.fspath(spec)
    loaded = spec if isinstance(spec, dict) else read_spec(spec)
    if fingerprint is not None and loaded["model"].get("fingerprint") != fingerprint:
        raise ValueError(
            f"{where} was made for another model: fingerprint "
            f"{loaded['model'].get('fingerprint')} != {fingerprint} of {what}"
        )
    return loaded, where


def cached(cache: dict[Any, Any], key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made on first use; the cache is emptied beyond 64 entries (alive counts
    change rarely, but a long run sees many sets, each a vector as long as the channels)."""
    if key not in cache:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = make()
    return cache[key]


class Indices(NamedTuple):
    """The plan's index arrays in some framework's type (:meth:`Binding.indices`)."""

    buckets: list[Any]  # per bucket, its (channels x width) entries, flattened
    unsort: Any  # plan order -> group order
    segment: Any  # each plan channel's group


@dataclass(frozen=True)
class Param:
    """A spec tensor as the framework holds it.

    Most exports only permute a parameter's axes (``perm``). Some also reshape it (Keras'
    MultiHeadAttention kernels ``(E, H, D)`` export as ``(E, H*D)``): then ``view`` is the ONNX
    shape, and slices, statistics and dead indices are taken on the *view* (the parameter
    permuted by ``perm``, reshaped to ``view``), whose axes are the ONNX axes."""

    name: str  # the framework's own name (state_dict key, Keras variable path)
    shape: tuple[int, ...]  # in the framework's layout
    perm: tuple[int, ...]  # ONNX axis a is framework axis perm[a]
    trainable: bool = True  # a parameter (not a buffer / non-trainable variable)
    view: tuple[int, ...] | None = None  # the ONNX shape, when the export reshapes it

    def axis(self, onnx_axis: int) -> int:
        """The axis slices along ONNX ``onnx_axis`` lie on: the framework's, or the view's."""
        return onnx_axis if self.view is not None else self.perm[onnx_axis]

    def extent(self, axis: int) -> int:
        """Length of :meth:`axis`'s result."""
        return (self.view or self.shape)[axis]

    def onnx_shape(self) -> tuple[int, ...] | None:
        if self.view is not None:
            return self.view
        return (
            tuple(self.shape[a] for a in self.perm) if len(self.perm) == len(self.shape) else None
        )

    def to_view(self, x: Any, ops: ArrayOps = NUMPY) -> Any:
        """The parameter's value (numpy, or a framework tensor with its ``ops``) as the axes of
        :meth:`axis` see it."""
        return x if self.view is None else ops.reshape(ops.transpose(x, self.perm), self.view)

    def from_view(self, x: np.ndarray) -> np.ndarray:
        """:meth:`to_view` undone."""
        if self.view is None:
            return x
        return x.reshape([self.shape[a] for a in self.perm]).transpose(np.argsort(self.perm))

    def sliced(self, x: np.ndarray, kept: Mapping[int, Sequence[int]]) -> np.ndarray:
        """``x`` (framework layout) keeping only the ``kept`` indices along :meth:`axis`'s axes,
        in framework layout. Through a view, the kept entries must be whole slices of the
        framework's axes (a head of a ``(E, H, D)`` kernel seen as ``(E, H*D)``); else a
        ``ValueError``."""
        if self.view is None:
            for axis, idx in kept.items():
                x = np.take(x, idx, axis)
            return x
        permuted = [self.shape[a] for a in self.perm]
        where = np.arange(math.prod(permuted)).reshape(permuted)
        picked = where.reshape(self.view)
        for axis, idx in kept.items():
            picked = np.take(picked, idx, axis)
        coords = np.unravel_index(picked.reshape(-1), permuted)
        keep = np.ix_(*[np.unique(c) for c in coords])
        if where[keep].size != picked.size or not np.array_equal(
            where[keep].ravel(), picked.ravel()
        ):
            raise ValueError(f"'{self.name}': the kept slices are no whole slices of its axes")
        return np.transpose(x, self.perm)[keep].transpose(np.argsort(self.perm))


def with_views(params: Mapping[str, Param], spec: Mapping[str, Any]) -> dict[str, Param]:
    """``params`` with :attr:`Param.view` set where the spec's ONNX shape of a tensor (its
    ``tensors``) differs from the permuted parameter's but holds as many values."""
    shapes = spec.get("tensors", {})
    out = dict(params)
    for name, p in params.items():
        want = shapes.get(name)
        if want is None or tuple(want) == p.onnx_shape():
            continue
        if len(p.perm) == len(p.shape) and math.prod(want) == math.prod(p.shape):
            out[name] = replace(p, view=tuple(int(d) for d in want))
    return out


@dataclass(frozen=True)
class Source:
    """One block of per-slice statistics: the slices of ``tensor`` along framework ``axis``."""

    tensor: str  # spec name
    axis: int  # framework axis
    stat: Stat  # abs: max |x| of a slice (gammas); norm: sqrt(mean x^2) [+ l1 mean |x|]
    offset: int  # first row in the concatenated statistics


@dataclass
class Binding:
    """A spec bound to a model's parameters, with the regularizer as a few array operations.

    Every source's per-slice statistics are concatenated into one flat vector (the 1-D gammas
    first, raw, so one ``abs`` covers them). A regularized channel is the max of its distinct
    entries there: MorphNet's max over a channel's slices and its sources (residual adds, tied
    convs). Channels with the same number of entries form a bucket (one gather and, beyond one
    entry, one max), so all groups cost a few array ops. The plan's channel order is the
    buckets'; ``segment[c]`` is the group of plan channel ``c`` (position in :attr:`gids`), so
    alive counts are one segment sum; ``unsort`` takes plan order back to group order.
    """

    spec: dict[str, Any]
    where: str
    params: Mapping[str, Param]
    options: Options
    groups: list[Mapping[str, Any]] = field(init=False)
    sources: list[Source] = field(init=False)
    raw: int = field(init=False)  # the first ``raw`` sources are 1-D gammas, concatenated raw
    buckets: list[np.ndarray] = field(init=False)  # (channels, width) indices into the stats
    segment: np.ndarray = field(init=False)
    unsort: np.ndarray = field(init=False)
    gids: list[str] = field(init=False)
    sizes: list[int] = field(init=False)
    unmapped: list[str] = field(init=False)
    cache: dict[tuple[float, ...], Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.fingerprint: str = self.spec["model"].get("fingerprint", "")
        self.attention = recorded_attention(self.spec, self.where)
        self.groups = select_groups(self.spec, self.options.exclude)
        self.params = with_views(self.params, self.spec)
        members = {m["tensor"] for g in self.spec["groups"] for m in g["members"]}
        self.unmapped = sorted(members - set(self.params))
        self._check_shapes()
        self._plan()

    # ------------------------------------------------------------------ checks

    def _check_shapes(self) -> None:
        covered: dict[tuple[str, int], set[int]] = {}
        for g in self.spec["groups"]:
            for m in g["members"]:
                if m["tensor"] in self.params:
                    key = (m["tensor"], int(m["axis"]))
                    covered.setdefault(key, set()).update(i for p in m["positions"] for i in p)
        for (name, axis), idx in covered.items():
            p = self.params[name]
            onnx_shape = p.onnx_shape()
            if onnx_shape is None or axis >= len(onnx_shape) or len(idx) != onnx_shape[axis]:
                raise ValueError(
                    f"{self.where}: spec does not fit the model: '{p.name}' has shape "
                    f"{list(p.shape)} in the model, the spec covers {len(idx)} channel slices "
                    f"up to index {max(idx)} on ONNX axis {axis} (is it another architecture?)"
                )

    def _chosen(self) -> list[tuple[Mapping[str, Any], list[Mapping[str, Any]], Stat]]:
        """Each regularized group with its source entries and their statistic."""
        chosen: list[tuple[Mapping[str, Any], list[Mapping[str, Any]], Stat]] = []
        for g in self.groups:
            reg = g["regularize"]
            if self.options.kind == "gamma" and reg["gammas"]:
                chosen.append((g, reg["gammas"], "abs"))
            elif reg["weights"]:
                chosen.append((g, reg["weights"], "norm"))
        names = {e["tensor"] for _, entries, _ in chosen for e in entries}
        bad = sorted(n for n in names if n not in self.params or not self.params[n].trainable)
        if bad:
            raise ValueError(
                f"{self.where}: {len(bad)} regularization tensor(s) of the spec are not "
                f"parameters of the model (is the spec for this architecture?): {', '.join(bad)}"
            )
        if not chosen:
            raise ValueError(
                f"{self.where}: no prunable group left to regularize (all excluded, or none has a "
                "batch-norm gamma or producing weight); the loss would stay 0"
            )
        return chosen

    def _plan(self) -> None:
        chosen = self._chosen()
        keys = {
            (e["tensor"], self.params[e["tensor"]].axis(int(e["axis"])), stat): None
            for _, entries, stat in chosen
            for e in entries
        }

        def raw(key: tuple[str, int, Stat]) -> bool:  # a 1-D gamma: its statistic is |x|
            p = self.params[key[0]]
            return key[2] == "abs" and len(p.shape) == 1 and p.view is None

        self.raw = sum(map(raw, keys))
        self.sources, offset = [], 0
        for tensor, axis, stat in sorted(keys, key=lambda k: not raw(k)):  # raw ones first
            self.sources.append(Source(tensor, axis, stat, offset))
            offset += self.params[tensor].extent(axis)
        base = {(s.tensor, s.axis, s.stat): s.offset for s in self.sources}
        rows: list[list[int]] = []
        group_of: list[int] = []
        self.gids, self.sizes = [], []
        for gi, (g, entries, stat) in enumerate(chosen):
            per_channel: list[dict[int, None]] = [{} for _ in range(g["channels"])]
            for e in entries:
                start = base[(e["tensor"], self.params[e["tensor"]].axis(int(e["axis"])), stat)]
                for k, pos in enumerate(e["positions"]):
                    per_channel[k].update((start + i, None) for i in pos)
            rows.extend(list(r) for r in per_channel)
            group_of.extend([gi] * g["channels"])
            self.gids.append(g["id"])
            self.sizes.append(g["channels"])
        widths = np.array([len(r) for r in rows])
        plan = np.argsort(widths, kind="stable")  # plan position -> group-order position
        self.buckets = [
            np.array([rows[c] for c in plan[widths[plan] == w]], dtype=np.int64)
            for w in np.unique(widths)
        ]
        self.segment = np.array(group_of, dtype=np.int64)[plan]
        self.unsort = np.argsort(plan).astype(np.int64)

    # ------------------------------------------------------------------ channel values

    def indices(self, constant: Callable[[np.ndarray], Any]) -> Indices:
        """The plan's index arrays as framework constants (``constant`` converts one), for an
        adapter to make once."""
        return Indices(
            [constant(b.reshape(-1)) for b in self.buckets],
            constant(self.unsort),
            constant(self.segment),
        )

    def values(self, ops: ArrayOps, tensors: Sequence[Any], indices: Indices) -> Any:
        """Every regularized channel's value, flat, in plan order (see :class:`Binding`).

        ``tensors``: the framework tensor of each of :attr:`sources`, in order."""
        stats = [abs(ops.cat(tensors[: self.raw]))] if self.raw else []
        for s, x in zip(self.sources[self.raw :], tensors[self.raw :], strict=True):
            x = self.params[s.tensor].to_view(x, ops)
            if s.stat == "abs":
                stats.append(ops.amax(abs(ops.rows(x, s.axis)), 1))
            else:
                stats.append(filter_norm(ops, x, s.axis, self.options.l1_fraction))
        flat = stats[0] if len(stats) == 1 else ops.cat(stats)
        parts = []
        for bucket, idx in zip(self.buckets, indices.buckets, strict=True):
            picked = ops.take(flat, idx)
            width = bucket.shape[1]
            parts.append(picked if width == 1 else ops.amax(ops.reshape(picked, (-1, width)), 1))
        return parts[0] if len(parts) == 1 else ops.cat(parts)

    # ------------------------------------------------------------------ cost and loss

    def counts(self, alive: Sequence[float]) -> tuple[float, ...]:
        """Alive counts per group (from a segment sum of ``vector > threshold``), floored at one
        as the mask does; the key of :meth:`coefficients`."""
        return tuple(max(1.0, float(c)) for c in alive)

    def coefficients(self, counts: tuple[float, ...]) -> tuple[float, np.ndarray]:
        """(cost, loss coefficient of every channel in plan order, float64) at these counts.

        The loss is ``dot(coefficients, channel values)``. Counts change rarely during training,
        so results are cached (adapters may keep framework copies in :attr:`cache` too)."""

        def compute() -> tuple[float, np.ndarray]:
            value, coeff = cost_and_coefficients(
                self.spec,
                dict(zip(self.gids, counts, strict=True)),
                cost=self.options.cost,
                device=self.options.device,
            )
            per_group = np.array([coeff.get(g, 0.0) for g in self.gids], dtype=np.float64)
            return value, per_group[self.segment]

        return cached(self.cache, counts, compute)  # type: ignore[no-any-return]

    def split(self, ops: ArrayOps, flat: Any, indices: Indices) -> dict[str, Any]:
        """Plan-order channel values (:meth:`values`) as ``{group id: vector}``."""
        flat = ops.take(flat, indices.unsort)
        out, start = {}, 0
        for gid, n in zip(self.gids, self.sizes, strict=True):
            out[gid] = flat[start : start + n]
            start += n
        return out

    # ------------------------------------------------------------------ masks

    def keep(self, keep: Any) -> dict[str, list[bool]]:
        """A mask dict, ``MaskResult`` or mask file (checked against the spec's fingerprint)."""
        if hasattr(keep, "keep"):
            return dict(keep.keep)
        if isinstance(keep, (str, os.PathLike)):
            fp, groups = read_mask(keep)
            if self.fingerprint and fp != self.fingerprint:
                raise ValueError(f"{os.fspath(keep)}: mask was made for another model")
            made = file_attention(keep, MASK_FORMAT)
            if made != self.attention:
                raise ValueError(
                    f"{os.fspath(keep)}: mask groups attention by '{made}', the spec by "
                    f"'{self.attention}'"
                )
            return groups
        return {k: list(v) for k, v in keep.items()}

    def dead_slices(
        self, keep: Mapping[str, Sequence[bool]], strict: bool
    ) -> tuple[dict[str, dict[int, list[int]]], list[str]]:
        """(framework name -> framework axis -> dead indices, spec members not in the model).

        A member the adapter could not bind is an error when ``strict`` (slicing needs every
        one); otherwise it is returned, for the adapter to warn about."""
        by_id = {g["id"]: g for g in self.spec["groups"]}
        out: dict[str, dict[int, list[int]]] = {}
        missing: set[str] = set()
        for gid, alive in keep.items():
            g = by_id.get(gid)
            if g is None or not g["prunable"]:
                raise ValueError(f"group '{gid}' is not a prunable group of the spec")
            if len(alive) != g["channels"] or not any(alive):
                raise ValueError(f"group '{gid}': mask must list {g['channels']} flags, one true")
            dead = [k for k, a in enumerate(alive) if not a]
            for m in g["members"] if dead else []:
                p = self.params.get(m["tensor"])
                if p is None:
                    missing.add(m["tensor"])
                    continue
                slot = out.setdefault(p.name, {}).setdefault(p.axis(int(m["axis"])), [])
                slot.extend(i for k in dead for i in m["positions"][k])
        if missing and strict:
            raise ValueError(
                "dead channels have slices in tensors that are not parameters of the model: "
                + ", ".join(sorted(missing))
            )
        return out, sorted(missing)
