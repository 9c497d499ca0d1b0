"""Device profiles for a roofline latency model.

MorphNet (Gordon et al., CVPR 2018) estimates an op's latency on a target device with a
roofline model: an op takes as long as the slower of its compute (FLOPs / peak FLOP/s) and
its memory traffic (bytes / memory bandwidth). That is cheap, needs no hardware, and is
enough to rank which channels cost the most time, so pruning can target latency rather than
FLOPs. This module holds the device numbers: MorphNet's own table, a few current
accelerators, and user profiles read from ``.json`` or ``.toml`` files (``morphonnx calibrate``
writes one for the machine it runs on).

One peak is a poor fit for real kernels: a depthwise conv reaches a small fraction of what a dense
conv does, and every op pays a fixed launch/dispatch cost however small it is. A profile may
therefore give a peak per op kind (:data:`OP_KINDS`) and a per-op overhead; :meth:`Device.latency`
is the one roofline formula every cost (analyze, spec, the adapters' latency loss) goes through.
A runtime also folds some ops into the Conv before them (onnxruntime: BatchNormalization into the
weights, Relu/Clip into the kernel's epilogue): a profile lists them (``fused_ops``) and such an op
then costs nothing (:meth:`Device.fuses`), not a memory pass of its own. And a kernel reaches its
peak only on enough work: a pointwise conv over few input channels, or a depthwise conv over a small
feature map, runs well below it. A profile may give an op kind an efficiency curve (:class:`Curve`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphonnx.errors import MorphonnxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "BUILTIN",
    "DEFAULT_DEVICES",
    "FUSES_INTO",
    "OP_KINDS",
    "Curve",
    "Device",
    "OpShape",
    "list_devices",
    "profile_toml",
    "resolve_device",
    "resolve_devices",
    "roofline_kind",
]

DEFAULT_DEVICES = ("V100",)
"""Devices costed when none are named (MorphNet's own reference device)."""

_GIGA = 1e9
_MICRO = 1e-6

OP_KINDS = ("conv", "depthwise", "gemm", "conv_unaligned", "depthwise_unaligned")
"""Op kinds a profile may give its own peak: dense (and grouped) convolutions, depthwise
convolutions, and Gemm/MatMul. Every other op uses ``peak_flops``. The ``_unaligned`` kinds are
convolutions whose input channel count is not a multiple of the profile's ``channel_multiple``:
CPU kernels work on blocks of channels and fall back to slower code when the channels they reduce
over do not fill the blocks (an output count off the multiple is padded to the block and runs at
about the aligned speed; ``calibrate`` measures both kinds)."""


FUSES_INTO = ("Conv",)
"""Op types whose output ops of ``Device.fused_ops`` can be folded into."""


def roofline_kind(op_type: str, depthwise: bool = False) -> str | None:
    """The :data:`OP_KINDS` entry of an op (None for ops without one of their own)."""
    if op_type in ("Conv", "ConvTranspose"):
        return "depthwise" if depthwise else "conv"
    if op_type in ("Gemm", "MatMul"):
        return "gemm"
    return None


@dataclass(frozen=True)
class OpShape:
    """What a kernel's speed depends on beyond its kind: a conv's (input, output) channel counts
    (aligned or not) and the reduction length and output positions of :class:`Curve`; 0 (or no
    channels) where unknown, which leaves the peak as it is."""

    channels: tuple[float, ...] = ()
    reduction: float = 0.0
    positions: float = 0.0


@dataclass(frozen=True)
class Curve:
    """How much of its peak an op kind reaches: ``r / (r + reduction_half)`` times ``p / (p +
    positions_half)``, where ``r`` is the reduction length (inputs per output value: a conv's
    input channels per group x kernel area, a MatMul's inner dimension) and ``p`` the output
    positions per output channel (batch x H x W; a MatMul's rows). Rising in both, at most 1; a
    half of 0 leaves that factor at 1."""

    reduction_half: float = 0.0
    positions_half: float = 0.0

    def __call__(self, reduction: float, positions: float) -> float:
        return _saturating(reduction, self.reduction_half) * _saturating(
            positions, self.positions_half
        )


def _saturating(x: float, half: float) -> float:
    """``x / (x + half)``, written so that every rounding step is monotone in ``x``."""
    return 1.0 / (1.0 + half / x) if half > 0 and x > 0 else 1.0


@dataclass(frozen=True)
class Device:
    """A target device for the roofline model: peak compute and memory bandwidth."""

    name: str
    peak_flops: float  # FLOP/s
    mem_bandwidth: float  # bytes/s
    bytes_per_element: int | None = None  # overrides tensor dtype size when set
    note: str = ""
    op_peaks: tuple[tuple[str, float], ...] = ()  # (op kind, FLOP/s) pairs overriding peak_flops
    overhead: float = 0.0  # seconds every op pays on top of its roofline time
    threads: int | None = None  # intra-op threads the profile was measured with (calibrate)
    channel_multiple: int | None = None  # conv input channel counts off this are "unaligned"
    fused_ops: tuple[str, ...] = ()  # op types the runtime folds into the Conv they follow
    curves: tuple[tuple[str, Curve], ...] = ()  # (op kind, efficiency curve) pairs

    def __post_init__(self) -> None:
        rates = [("peak_flops", self.peak_flops), ("mem_bandwidth", self.mem_bandwidth)]
        for field, value in rates + [(f"peak of {k}", v) for k, v in self.op_peaks]:
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"device {self.name!r}: {field} must be a positive number")
        unknown = [k for k, _ in self.op_peaks if k not in OP_KINDS]
        if unknown:
            raise ValueError(f"device {self.name!r}: unknown op kind {unknown[0]!r}")
        if not (math.isfinite(self.overhead) and self.overhead >= 0):
            raise ValueError(f"device {self.name!r}: overhead must be 0 or more seconds")
        if self.bytes_per_element is not None and self.bytes_per_element <= 0:
            raise ValueError(f"device {self.name!r}: bytes_per_element must be positive")
        if self.channel_multiple is not None and self.channel_multiple < 1:
            raise ValueError(f"device {self.name!r}: channel_multiple must be positive")
        if not all(isinstance(op, str) and op for op in self.fused_ops):
            raise ValueError(f"device {self.name!r}: fused_ops must be op type names")
        for kind, c in self.curves:
            if kind not in OP_KINDS:
                raise ValueError(f"device {self.name!r}: unknown op kind {kind!r}")
            for half in (c.reduction_half, c.positions_half):
                if not (math.isfinite(half) and half >= 0):
                    raise ValueError(f"device {self.name!r}: curve halves must be 0 or more")

    def fuses(self, chains: Sequence[Sequence[str]]) -> bool:
        """Whether an op costs nothing: each of ``chains`` is the op types from a Conv whose
        output it alone reads, through ops that alone read each other's output, to the op itself
        (``("Conv", "BatchNormalization", "Relu")``); fused when every op after the Conv of one of
        them is in ``fused_ops``."""
        return any(
            len(chain) > 1
            and chain[0] in FUSES_INTO
            and all(op in self.fused_ops for op in chain[1:])
            for chain in chains
        )

    def peak(self, kind: str | None = None, op: OpShape | None = None) -> float:
        """Attainable FLOP/s of an op kind (:data:`OP_KINDS`): its own peak, else ``peak_flops``;
        the kind's ``_unaligned`` peak when the op's input channel count is off the profile's
        ``channel_multiple``; times the kind's efficiency curve at the op's shape (an
        ``_unaligned`` kind without a curve of its own uses its kind's)."""
        op = op or OpShape()
        peaks = dict(self.op_peaks)
        m = self.channel_multiple
        if kind and m and op.channels and round(op.channels[0]) % m:
            kind = f"{kind}_unaligned" if f"{kind}_unaligned" in peaks else kind
        curves = dict(self.curves)
        curve = curves.get(kind or "") or curves.get((kind or "").removesuffix("_unaligned"))
        scale = curve(op.reduction, op.positions) if curve else 1.0
        return peaks.get(kind or "", self.peak_flops) * scale

    def latency(
        self, flops: float, nbytes: float, kind: str | None = None, op: OpShape | None = None
    ) -> float:
        """Roofline seconds of one op: ``overhead + max(flops / peak(kind, op), nbytes /
        mem_bandwidth)``; built-in profiles have no overhead and one peak (MorphNet's model)."""
        peak = self.peak(kind, op)
        return self.overhead + max(flops / peak, nbytes / self.mem_bandwidth)

    def bound(
        self, flops: float, nbytes: float, kind: str | None = None, op: OpShape | None = None
    ) -> str:
        """``"compute"`` if compute time >= memory time, else ``"memory"``."""
        if flops / self.peak(kind, op) >= nbytes / self.mem_bandwidth:
            return "compute"
        return "memory"


class _CaseInsensitiveDict(dict[str, Device]):
    """A dict keyed by lowercase device name whose lookups ignore case."""

    def __getitem__(self, key: str) -> Device:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


def _gpu(name: str, gflops: float, gbps: float, note: str) -> Device:
    return Device(name=name, peak_flops=gflops * _GIGA, mem_bandwidth=gbps * _GIGA, note=note)


_MORPHNET = "MorphNet latency table (Gordon et al. 2018)"

# Fixed order: MorphNet's six devices first, then current accelerators.
_ORDERED: tuple[Device, ...] = (
    _gpu("K80", 8740, 480, f"{_MORPHNET}: FP32 peak, both GK210 dies"),
    _gpu("P4", 5500, 192, f"{_MORPHNET}: FP32 peak"),
    _gpu("T4", 8100, 300, f"{_MORPHNET}: FP32 peak"),
    _gpu("P100", 9300, 732, f"{_MORPHNET}: FP32 peak, SXM2 HBM2"),
    _gpu("V100", 125000, 900, f"{_MORPHNET}: FP16 tensor-core peak, SXM2 HBM2"),
    _gpu("TPUv2", 22500, 300, f"{_MORPHNET}: one TPUv2 core, bf16 MXU peak"),
    _gpu(
        "A100",
        312000,
        1555,
        "NVIDIA A100 datasheet, 40GB SXM: dense FP16/BF16 tensor-core peak "
        "(no sparsity), like the V100 tensor-core convention",
    ),
    _gpu("A100-FP32", 19500, 1555, "NVIDIA A100 datasheet, 40GB SXM: FP32 (non-tensor) peak"),
    _gpu(
        "H100",
        989000,
        3350,
        "NVIDIA H100 datasheet, SXM: dense FP16/BF16 tensor-core peak (no sparsity)",
    ),
    _gpu("H100-FP32", 67000, 3350, "NVIDIA H100 datasheet, SXM: FP32 (non-tensor) peak"),
    _gpu(
        "CPU",
        500,
        50,
        "generic modern 8-core AVX2 desktop: ~8 cores x 2 FMA x 8 fp32 lanes x 2 x ~2 GHz "
        "sustained, dual-channel DDR4/DDR5",
    ),
)

#: Built-in device profiles; lookups are case-insensitive (``BUILTIN["v100"]``).
BUILTIN: dict[str, Device] = _CaseInsensitiveDict((d.name.lower(), d) for d in _ORDERED)


def list_devices() -> list[Device]:
    """All built-in devices, MorphNet's six first, then the others."""
    return list(_ORDERED)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_KNOWN = {
    "name",
    "peak_flops",
    "peak_gflops",
    "mem_bandwidth",
    "mem_bandwidth_gbps",
    "bytes_per_element",
    "note",
    "peak_flops_by_op",
    "peak_gflops_by_op",
    "overhead_s",
    "overhead_us",
    "threads",
    "channel_multiple",
    "fused_ops",
    "efficiency",
}


def _positive_number(where: str, data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MorphonnxError(f"{where}: {key!r} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise MorphonnxError(f"{where}: {key!r} must be a positive finite number, got {value!r}")
    return float(value)


RATE_RANGE = (1.0, 1e21)
"""Plausible per-second rates (FLOP/s, bytes/s): from a microcontroller to far beyond any
machine. Outside it a latency is 0, infinite or denormal, which no report can use."""


def _rate(where: str, data: dict[str, Any], base: str, giga: str) -> float:
    if base in data and giga in data:
        raise MorphonnxError(f"{where}: give only one of {base!r} and {giga!r}")
    if base in data:
        key, rate = base, _positive_number(where, data, base)
    elif giga in data:
        key, rate = giga, _positive_number(where, data, giga) * _GIGA
    else:
        raise MorphonnxError(f"{where}: missing key {base!r} (or {giga!r})")
    low, high = RATE_RANGE
    if not low <= rate <= high:
        raise MorphonnxError(
            f"{where}: {key!r} is {data[key]!r}, outside the plausible range of "
            f"{low:g} to {high:g} per second"
        )
    return rate


def _refuse_unknown(where: str, keys: Iterable[str], allowed: Sequence[str], what: str) -> None:
    unknown = sorted(set(keys) - set(allowed))
    if unknown:
        raise MorphonnxError(
            f"{where}: unknown {what} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )


def _op_peaks(where: str, data: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    if "peak_flops_by_op" in data and "peak_gflops_by_op" in data:
        raise MorphonnxError(
            f"{where}: give only one of 'peak_flops_by_op' and 'peak_gflops_by_op'"
        )
    key = "peak_gflops_by_op" if "peak_gflops_by_op" in data else "peak_flops_by_op"
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise MorphonnxError(f"{where}: {key!r} must be a table of op kind = number")
    _refuse_unknown(where, table, OP_KINDS, f"op kind(s) in {key!r}:")
    scale = _GIGA if key == "peak_gflops_by_op" else 1.0
    return tuple(
        (k, _positive_number(f"{where}: {key}", table, k) * scale) for k in OP_KINDS if k in table
    )


_CURVE_KEYS = ("reduction_half", "positions_half")


def _curves(where: str, data: dict[str, Any]) -> tuple[tuple[str, Curve], ...]:
    table = data.get("efficiency", {})
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise MorphonnxError(f"{where}: 'efficiency' must be a table of op kind tables")
    _refuse_unknown(where, table, OP_KINDS, "op kind(s) in 'efficiency':")
    curves = []
    for kind in (k for k in OP_KINDS if k in table):
        entry, at = table[kind], f"{where}: efficiency.{kind}"
        _refuse_unknown(at, entry, _CURVE_KEYS, "key(s)")
        halves = [_non_negative(at, entry, k) for k in _CURVE_KEYS]
        curves.append((kind, Curve(*halves)))
    return tuple(curves)


def _non_negative(where: str, data: dict[str, Any], key: str) -> float:
    value = data.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MorphonnxError(f"{where}: {key!r} must be a number, got {value!r}")
    if value < 0:
        raise MorphonnxError(f"{where}: {key!r} must be 0 or more, got {value!r}")
    return float(value)


def _overhead(where: str, data: dict[str, Any]) -> float:
    if "overhead_s" in data and "overhead_us" in data:
        raise MorphonnxError(f"{where}: give only one of 'overhead_s' and 'overhead_us'")
    key = "overhead_us" if "overhead_us" in data else "overhead_s"
    return _non_negative(where, data, key) * (_MICRO if key == "overhead_us" else 1.0)


def _load_profile(path: Path) -> Device:
    where = str(path)
    if not path.is_file():
        raise MorphonnxError(f"{where}: device profile file not found")
    try:
        if path.suffix.lower() == ".json":
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MorphonnxError(f"{where}: invalid JSON: {_one_line(str(err))}") from err
    except tomllib.TOMLDecodeError as err:
        raise MorphonnxError(f"{where}: invalid TOML: {_one_line(str(err))}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise MorphonnxError(f"{where}: cannot read device profile: {_one_line(str(err))}") from err
    except RecursionError:
        raise MorphonnxError(f"{where}: device profile nested too deeply") from None

    if not isinstance(data, dict):
        raise MorphonnxError(f"{where}: device profile must be an object/table of keys")
    _refuse_unknown(where, data, sorted(_KNOWN), "key(s)")
    if "name" not in data:
        raise MorphonnxError(f"{where}: missing key 'name'")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise MorphonnxError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if name in BUILTIN:
        raise MorphonnxError(
            f"{where}: name {name!r} is a built-in device's; give your profile its own name"
        )
    peak = _rate(where, data, "peak_flops", "peak_gflops")
    bandwidth = _rate(where, data, "mem_bandwidth", "mem_bandwidth_gbps")

    bpe = data.get("bytes_per_element")
    if bpe is not None and (isinstance(bpe, bool) or not isinstance(bpe, int) or bpe <= 0):
        raise MorphonnxError(
            f"{where}: 'bytes_per_element' must be a positive integer, got {bpe!r}"
        )
    note = data.get("note", f"user profile {where}")
    if not isinstance(note, str):
        raise MorphonnxError(f"{where}: 'note' must be a string, got {note!r}")
    threads = data.get("threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 0
    ):
        raise MorphonnxError(f"{where}: 'threads' must be an integer >= 0, got {threads!r}")
    multiple = data.get("channel_multiple")
    if multiple is not None and (
        isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1
    ):
        raise MorphonnxError(
            f"{where}: 'channel_multiple' must be a positive integer, got {multiple!r}"
        )
    fused = data.get("fused_ops", [])
    if not isinstance(fused, list) or not all(isinstance(op, str) and op for op in fused):
        raise MorphonnxError(f"{where}: 'fused_ops' must be a list of op type names, got {fused!r}")
    return Device(
        name=name,
        peak_flops=peak,
        mem_bandwidth=bandwidth,
        bytes_per_element=bpe,
        note=note,
        op_peaks=_op_peaks(where, data),
        overhead=_overhead(where, data),
        threads=threads,
        channel_multiple=multiple,
        fused_ops=tuple(fused),
        curves=_curves(where, data),
    )


def profile_toml(device: Device) -> str:
    """``device`` as a TOML profile that :func:`resolve_device` reads back to an equal Device."""

    def num(x: float) -> str:
        return repr(float(x))

    lines = [
        f"name = {json.dumps(device.name)}",
        f"note = {json.dumps(_one_line(device.note))}",
        f"peak_gflops = {num(device.peak_flops / _GIGA)}",
        f"mem_bandwidth_gbps = {num(device.mem_bandwidth / _GIGA)}",
        f"overhead_us = {num(device.overhead / _MICRO)}",
    ]
    if device.bytes_per_element is not None:
        lines.append(f"bytes_per_element = {device.bytes_per_element}")
    if device.threads is not None:
        lines.append(f"threads = {device.threads}")
    if device.channel_multiple is not None:
        lines.append(f"channel_multiple = {device.channel_multiple}")
    if device.fused_ops:
        lines.append(f"fused_ops = {json.dumps(list(device.fused_ops))}")
    if device.op_peaks:
        lines += ["", "[peak_gflops_by_op]"]
        lines += [f"{k} = {num(v / _GIGA)}" for k, v in device.op_peaks]
    for kind, c in device.curves:
        lines += ["", f"[efficiency.{kind}]"]
        lines += [f"{k} = {num(getattr(c, k))}" for k in _CURVE_KEYS]
    return "\n".join(lines) + "\n"


def resolve_devices(specs: Sequence[Device | str]) -> list[Device]:
    """Several devices (objects, names or profile paths); their names must differ (reports and
    JSON are keyed by name)."""
    devices: list[Device] = []
    for spec in specs:
        d = spec if isinstance(spec, Device) else resolve_device(spec)
        if any(d.name.lower() == e.name.lower() for e in devices):
            raise MorphonnxError(f"{spec}: device {d.name!r} is given twice")
        devices.append(d)
    return devices


def resolve_device(spec: str) -> Device:
    """A built-in device by name (any case) or a user profile from a ``.json``/``.toml`` path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if path.suffix.lower() in (".json", ".toml"):
        return _load_profile(path)
    names = ", ".join(d.name for d in _ORDERED)
    raise MorphonnxError(
        f"{spec}: unknown device; use one of {names}, or a path to a .json/.toml profile"
    )
