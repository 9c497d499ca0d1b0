"""Device profiles for a roofline latency model.

MorphNet (Gordon et al., CVPR 2018) estimates an op's latency on a target device with a
roofline model: an op takes as long as the slower of its compute (FLOPs / peak FLOP/s) and
its memory traffic (bytes / memory bandwidth). That is cheap, needs no hardware, and is
enough to rank which channels cost the most time, so pruning can target latency rather than
FLOPs. This module holds the device numbers: MorphNet's own table, a few current
accelerators, and user profiles read from ``.json`` or ``.toml`` files.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphonnx.errors import MorphonnxError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["BUILTIN", "DEFAULT_DEVICES", "Device", "list_devices", "resolve_device"]

DEFAULT_DEVICES = ("V100",)
"""Devices costed when none are named (MorphNet's own reference device)."""

_GIGA = 1e9


@dataclass(frozen=True)
class Device:
    """A target device for the roofline model: peak compute and memory bandwidth."""

    name: str
    peak_flops: float  # FLOP/s
    mem_bandwidth: float  # bytes/s
    bytes_per_element: int | None = None  # overrides tensor dtype size when set
    note: str = ""

    def __post_init__(self) -> None:
        for field, value in (
            ("peak_flops", self.peak_flops),
            ("mem_bandwidth", self.mem_bandwidth),
        ):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"device {self.name!r}: {field} must be a positive number")
        if self.bytes_per_element is not None and self.bytes_per_element <= 0:
            raise ValueError(f"device {self.name!r}: bytes_per_element must be positive")

    def latency(self, flops: float, nbytes: float) -> float:
        """Roofline latency in seconds: max(flops / peak_flops, nbytes / mem_bandwidth)."""
        return max(flops / self.peak_flops, nbytes / self.mem_bandwidth)

    def bound(self, flops: float, nbytes: float) -> str:
        """``"compute"`` if compute time >= memory time, else ``"memory"``."""
        if flops / self.peak_flops >= nbytes / self.mem_bandwidth:
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
}


def _positive_number(where: str, data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MorphonnxError(f"{where}: {key!r} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise MorphonnxError(f"{where}: {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _rate(where: str, data: dict[str, Any], base: str, giga: str) -> float:
    if base in data and giga in data:
        raise MorphonnxError(f"{where}: give only one of {base!r} and {giga!r}")
    if base in data:
        return _positive_number(where, data, base)
    if giga in data:
        return _positive_number(where, data, giga) * _GIGA
    raise MorphonnxError(f"{where}: missing key {base!r} (or {giga!r})")


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

    if not isinstance(data, dict):
        raise MorphonnxError(f"{where}: device profile must be an object/table of keys")
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise MorphonnxError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_KNOWN))}"
        )
    if "name" not in data:
        raise MorphonnxError(f"{where}: missing key 'name'")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise MorphonnxError(f"{where}: 'name' must be a non-empty string, got {name!r}")
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
    return Device(
        name=name, peak_flops=peak, mem_bandwidth=bandwidth, bytes_per_element=bpe, note=note
    )


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
