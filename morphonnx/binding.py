"""The framework-neutral half of every training adapter: a group spec bound to a model's own
parameters.

An adapter names, for each spec tensor it can find in its model, the framework's parameter: its
shape in the framework's layout and the axis map between the two layouts (ONNX axis ``a`` is
framework axis ``perm[a]``: Keras kernels are HWIO, torch's equal ONNX's). Everything else lives
here once: option checks, shape checks, the regularization plan (every group's vector from a few
gathers, see :class:`Binding`), MorphNet's loss coefficients per set of alive counts, and the dead
slices of a mask in the framework's layout. The adapter keeps export, tensor ops and stage 2.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from morphonnx.devices import Device, resolve_device
from morphonnx.formats import MASK_FORMAT, file_attention, read_mask, recorded_attention
from morphonnx.regularize import COSTS, KINDS, cost_and_coefficients, select_groups
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


@dataclass(frozen=True)
class Param:
    """A spec tensor as the framework holds it."""

    name: str  # the framework's own name (state_dict key, Keras variable path)
    shape: tuple[int, ...]  # in the framework's layout
    perm: tuple[int, ...]  # ONNX axis a is framework axis perm[a]
    trainable: bool = True  # a parameter (not a buffer / non-trainable variable)

    def axis(self, onnx_axis: int) -> int:
        return self.perm[onnx_axis]


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

    Every regularized channel of every group reads ``index[c]`` (a row of indices into the
    concatenation of the :attr:`sources`' per-slice statistics, padded by repeating its first
    entry) and takes their max: that is MorphNet's max over a channel's slices and over its
    sources (residual adds, tied convs), for all groups at once. ``segment[c]`` is the group of
    channel ``c`` (position in :attr:`gids`), so alive counts are one segment sum.
    """

    spec: dict[str, Any]
    where: str
    params: Mapping[str, Param]
    options: Options
    groups: list[Mapping[str, Any]] = field(init=False)
    sources: list[Source] = field(init=False)
    index: np.ndarray = field(init=False)
    segment: np.ndarray = field(init=False)
    gids: list[str] = field(init=False)
    sizes: list[int] = field(init=False)
    unmapped: list[str] = field(init=False)
    cache: dict[tuple[float, ...], Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.fingerprint: str = self.spec["model"].get("fingerprint", "")
        self.attention = recorded_attention(self.spec, self.where)
        self.groups = select_groups(self.spec, self.options.exclude)
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
            onnx_shape = [p.shape[a] for a in p.perm] if len(p.perm) == len(p.shape) else None
            if onnx_shape is None or axis >= len(onnx_shape) or len(idx) != onnx_shape[axis]:
                raise ValueError(
                    f"{self.where}: spec does not fit the model: '{p.name}' has shape "
                    f"{list(p.shape)} in the model, the spec covers {len(idx)} channel slices "
                    f"up to index {max(idx)} on ONNX axis {axis} (is it another architecture?)"
                )

    def _plan(self) -> None:
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
        blocks: dict[tuple[str, int, Stat], Source] = {}
        offset = 0
        rows: list[list[int]] = []
        segment: list[int] = []
        self.gids, self.sizes = [], []
        for gi, (g, entries, stat) in enumerate(chosen):
            per_channel: list[list[int]] = [[] for _ in range(g["channels"])]
            for e in entries:
                p = self.params[e["tensor"]]
                axis = p.axis(int(e["axis"]))
                key = (e["tensor"], axis, stat)
                if key not in blocks:
                    blocks[key] = Source(e["tensor"], axis, stat, offset)
                    offset += p.shape[axis]
                base = blocks[key].offset
                for k, pos in enumerate(e["positions"]):
                    per_channel[k].extend(base + i for i in pos)
            rows.extend(per_channel)
            segment.extend([gi] * g["channels"])
            self.gids.append(g["id"])
            self.sizes.append(g["channels"])
        width = max(len(r) for r in rows)
        self.index = np.array([r + [r[0]] * (width - len(r)) for r in rows], dtype=np.int64)
        self.segment = np.array(segment, dtype=np.int64)
        self.sources = list(blocks.values())

    # ------------------------------------------------------------------ cost and loss

    def counts(self, alive: Sequence[float]) -> tuple[float, ...]:
        """Alive counts per group (from a segment sum of ``vector > threshold``), floored at one
        as the mask does; the key of :meth:`coefficients`."""
        return tuple(max(1.0, float(c)) for c in alive)

    def coefficients(self, counts: tuple[float, ...]) -> tuple[float, np.ndarray]:
        """(cost, loss coefficient of every channel, float64) at these alive counts.

        The loss is ``dot(coefficients, channel values)``. Counts change rarely during training,
        so results are cached (adapters may keep framework copies in :attr:`cache` too)."""
        hit = self.cache.get(counts)
        if hit is None:
            value, coeff = cost_and_coefficients(
                self.spec,
                dict(zip(self.gids, counts, strict=True)),
                cost=self.options.cost,
                device=self.options.device,
            )
            per_group = np.array([coeff.get(g, 0.0) for g in self.gids], dtype=np.float64)
            if len(self.cache) > 4096:
                self.cache.clear()
            hit = self.cache[counts] = (value, np.repeat(per_group, self.sizes))
        return hit  # type: ignore[no-any-return]

    def split(self, flat: Any) -> dict[str, Any]:
        """A flat per-channel array as ``{group id: vector}`` (slices, so views where possible)."""
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


def onnx_fingerprint(path: str | os.PathLike[str]) -> str:
    import onnx

    from morphonnx.formats import fingerprint

    return fingerprint(onnx.load(os.fspath(path), load_external_data=False))


def export_and_spec(
    export: Callable[[str], None], spec_path: str | os.PathLike[str]
) -> dict[str, Any]:
    """Run an adapter's ``export(path)`` into a temporary folder, analyse the file and write its
    group spec to ``spec_path``; returns the spec."""
    import tempfile

    from morphonnx.api import make_spec
    from morphonnx.formats import write_json

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export(path)
        spec = make_spec(path, devices=())
    write_json(spec_path, spec)
    return spec


class RegularizerBase:
    """What every adapter's ``Regularizer`` shares: options, spec and binding, masks, mask files
    and the dead slices of stage 2. An adapter supplies :meth:`_params` (its parameters as
    :class:`Param`), :meth:`cost_and_loss` and :meth:`_values64` (float64 channel values)."""

    def __init__(
        self,
        model: Any,
        spec: str | os.PathLike[str] | dict[str, Any],
        kind: str = "gamma",
        cost: str = "flops",
        threshold: float = 1e-2,
        device: Any = None,
        l1_fraction: float = 0.0,
        exclude: str | Sequence[str] = (),
        onnx_path: str | os.PathLike[str] | None = None,
    ) -> None:
        options = check_options(kind, cost, threshold, device, l1_fraction, exclude)
        fp = None if onnx_path is None else onnx_fingerprint(onnx_path)
        loaded, where = load_spec(spec, fp, os.fspath(onnx_path or ""))
        self.model = model
        self.binding = Binding(loaded, where, self._params(loaded), options)
        self.spec, self.where, self.groups = loaded, where, self.binding.groups
        self.kind, self.cost_kind, self.threshold = kind, cost, options.threshold
        self.device, self.l1_fraction = options.device, options.l1_fraction
        self.fingerprint, self.unmapped = self.binding.fingerprint, self.binding.unmapped
        self.last_cost: float | None = None

    def _params(self, spec: dict[str, Any]) -> dict[str, Param]:
        raise NotImplementedError

    def _values64(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def cost_and_loss(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def loss(self) -> Any:
        """MorphNet's differentiable cost loss; add ``strength * reg.loss()`` to the task loss.
        The cost it saw is kept in ``last_cost`` (for logging without a second pass)."""
        return self.cost_and_loss()[1]

    def mask(self, threshold: float | None = None, round_to: int | None = None) -> Any:
        """The ``morphonnx.mask.MaskResult`` of the current weights (float64, like ``morphonnx
        mask``); a group the threshold would empty keeps its strongest channel; ``round_to=K``:
        alive counts to multiples of K, as ``morphonnx mask --round-to``."""
        from morphonnx.mask import make_mask

        t = self.threshold if threshold is None else threshold
        return make_mask(self._values64(), t, round_to)

    def write_mask(
        self,
        path: str | os.PathLike[str],
        threshold: float | None = None,
        round_to: int | None = None,
    ) -> Any:
        """Write the mask JSON (``morphonnx prune`` input) with the spec's fingerprint."""
        from morphonnx.formats import write_json

        result = self.mask(threshold, round_to)
        write_json(path, result.document(self.fingerprint, self.kind, self.binding.attention))
        return result

    def _cuts(
        self, keep: Any, strict: bool
    ) -> tuple[dict[str, list[bool]], dict[str, dict[int, list[int]]]]:
        """(the mask, framework name -> framework axis -> dead indices); ``keep`` is a mask dict,
        ``MaskResult`` or mask file, None for the current mask. Unbound members are an error when
        ``strict``, else a warning (a dead channel's consumers are zeroed, so such a constant
        cannot reach the outputs)."""
        keep = self.mask().keep if keep is None else self.binding.keep(keep)
        cuts, missing = self.binding.dead_slices(keep, strict)
        if missing:
            warnings.warn(
                "dead channels have slices in tensors that are not parameters or buffers of the "
                f"model (constants computed in forward?): {', '.join(missing)}; left as they are",
                stacklevel=3,
            )
        return keep, cuts
