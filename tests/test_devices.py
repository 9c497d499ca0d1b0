"""Tests for morphonnx.devices: built-in numbers, roofline latency, user profiles, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from morphonnx.devices import BUILTIN, Device, list_devices, resolve_device
from morphonnx.errors import MorphonnxError

MORPHNET = {
    "K80": (8740, 480),
    "P4": (5500, 192),
    "T4": (8100, 300),
    "P100": (9300, 732),
    "V100": (125000, 900),
    "TPUv2": (22500, 300),
}


@pytest.mark.parametrize("name", sorted(MORPHNET))
def test_morphnet_numbers(name: str) -> None:
    gflops, gbps = MORPHNET[name]
    dev = BUILTIN[name]
    assert dev.name == name
    assert dev.peak_flops == gflops * 1e9
    assert dev.mem_bandwidth == gbps * 1e9
    assert dev.note


def test_newer_devices_and_notes() -> None:
    expected = {
        "A100": (312e12, 1555e9),
        "A100-FP32": (19.5e12, 1555e9),
        "H100": (989e12, 3350e9),
        "H100-FP32": (67e12, 3350e9),
        "CPU": (500e9, 50e9),
    }
    for name, (peak, bw) in expected.items():
        dev = BUILTIN[name]
        assert math.isclose(dev.peak_flops, peak)
        assert math.isclose(dev.mem_bandwidth, bw)
        assert dev.note


def test_list_devices_order() -> None:
    names = [d.name for d in list_devices()]
    assert names[:6] == ["K80", "P4", "T4", "P100", "V100", "TPUv2"]
    assert set(names[6:]) == {"A100", "A100-FP32", "H100", "H100-FP32", "CPU"}
    assert len(names) == len(BUILTIN)


def test_case_insensitive_lookup() -> None:
    assert resolve_device("v100") is BUILTIN["V100"]
    assert resolve_device("TpUv2").name == "TPUv2"
    assert resolve_device("h100-fp32").name == "H100-FP32"
    assert "p100" in BUILTIN and BUILTIN["p100"] is BUILTIN["P100"]


# Inception-V2 Conv2d_2c_3x3: 56x56 output, 64 -> 192 channels, 3x3 kernel, batch 1, fp32.
CONV_FLOPS = 2 * 56 * 56 * 64 * 192 * 9
CONV_BYTES = (56 * 56 * 64 + 56 * 56 * 192) * 4 + 64 * 192 * 9 * 4


def test_inception_conv_p100() -> None:
    dev = resolve_device("P100")
    lat = dev.latency(CONV_FLOPS, CONV_BYTES)
    hand = max(CONV_FLOPS / 9300e9, CONV_BYTES / 732e9)
    assert math.isclose(lat, hand, rel_tol=1e-3)
    assert math.isclose(lat, 74.6e-6, rel_tol=0.005)
    assert dev.bound(CONV_FLOPS, CONV_BYTES) == "compute"


def test_inception_conv_v100() -> None:
    dev = resolve_device("V100")
    lat = dev.latency(CONV_FLOPS, CONV_BYTES)
    hand = max(CONV_FLOPS / 125000e9, CONV_BYTES / 900e9)
    assert math.isclose(lat, hand, rel_tol=1e-3)
    assert math.isclose(lat, 5.55e-6, rel_tol=0.01)
    assert dev.bound(CONV_FLOPS, CONV_BYTES) == "compute"


def test_memory_bound_elementwise() -> None:
    for dev in list_devices():
        assert dev.latency(0, 1e6) == pytest.approx(1e6 / dev.mem_bandwidth)
        assert dev.bound(0, 1e6) == "memory"


def test_device_rejects_nonpositive() -> None:
    with pytest.raises(ValueError):
        Device("x", 0.0, 1.0)
    with pytest.raises(ValueError):
        Device("x", 1.0, -1.0)


# --- user profiles -------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_json_profile_base_units(tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "edge.json",
        '{"name": "Edge", "peak_flops": 2e12, "mem_bandwidth": 1e11, "bytes_per_element": 1}',
    )
    dev = resolve_device(spec)
    assert dev == Device("Edge", 2e12, 1e11, 1, dev.note)
    assert dev.latency(4e12, 0) == pytest.approx(2.0)


def test_json_profile_giga_units(tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "edge.JSON",
        '{"name": "Edge", "peak_gflops": 2000, "mem_bandwidth_gbps": 100, "note": "mine"}',
    )
    dev = resolve_device(spec)
    assert dev.peak_flops == pytest.approx(2e12)
    assert dev.mem_bandwidth == pytest.approx(1e11)
    assert dev.bytes_per_element is None
    assert dev.note == "mine"


def test_toml_profile_base_units(tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "npu.toml",
        'name = "NPU"\npeak_flops = 4_000_000_000_000\nmem_bandwidth = 6.4e10\n'
        "bytes_per_element = 2\n",
    )
    dev = resolve_device(spec)
    assert dev.name == "NPU"
    assert dev.peak_flops == 4e12
    assert dev.mem_bandwidth == 6.4e10
    assert dev.bytes_per_element == 2


def test_toml_profile_giga_units(tmp_path: Path) -> None:
    spec = _write(
        tmp_path / "npu.toml", 'name = "NPU"\npeak_gflops = 4000\nmem_bandwidth_gbps = 64\n'
    )
    dev = resolve_device(spec)
    assert dev.peak_flops == pytest.approx(4e12)
    assert dev.mem_bandwidth == pytest.approx(6.4e10)


BAD_JSON = {
    "invalid_json": '{"name": "X", "peak_flops": ',
    "not_object": "[1, 2, 3]",
    "missing_name": '{"peak_flops": 1e12, "mem_bandwidth": 1e11}',
    "missing_peak": '{"name": "X", "mem_bandwidth": 1e11}',
    "missing_bw": '{"name": "X", "peak_gflops": 100}',
    "zero_peak": '{"name": "X", "peak_flops": 0, "mem_bandwidth": 1e11}',
    "negative_bw": '{"name": "X", "peak_flops": 1e12, "mem_bandwidth_gbps": -5}',
    "string_peak": '{"name": "X", "peak_flops": "fast", "mem_bandwidth": 1e11}',
    "bool_bw": '{"name": "X", "peak_flops": 1e12, "mem_bandwidth": true}',
    "both_spellings": '{"name": "X", "peak_flops": 1e12, "peak_gflops": 1000, "mem_bandwidth": 1}',
    "bad_bpe_zero": '{"name": "X", "peak_flops": 1e12, "mem_bandwidth": 1, "bytes_per_element": 0}',
    "bad_bpe_float": '{"name": "X", "peak_flops": 1, "mem_bandwidth": 1, "bytes_per_element": 2.5}',
    "bad_name": '{"name": 3, "peak_flops": 1e12, "mem_bandwidth": 1e11}',
    "unknown_key": '{"name": "X", "peak_flops": 1e12, "mem_bandwidth": 1e11, "tdp": 300}',
}

BAD_TOML = {
    "invalid_toml": 'name = "X"\npeak_flops = = 3\n',
    "missing_key_toml": 'name = "X"\npeak_gflops = 10\n',
    "unknown_key_toml": 'name = "X"\npeak_gflops = 10\nmem_bandwidth_gbps = 1\n[extra]\na = 1\n',
    "nonnumeric_toml": 'name = "X"\npeak_gflops = [1]\nmem_bandwidth_gbps = 1\n',
}


def _assert_one_line_naming(err: MorphonnxError, needle: str) -> str:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg
    assert needle in msg
    return msg


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_profiles(tmp_path: Path, case: str) -> None:
    spec = _write(tmp_path / f"{case}.json", BAD_JSON[case])
    with pytest.raises(MorphonnxError) as info:
        resolve_device(spec)
    _assert_one_line_naming(info.value, f"{case}.json")


@pytest.mark.parametrize("case", sorted(BAD_TOML))
def test_bad_toml_profiles(tmp_path: Path, case: str) -> None:
    spec = _write(tmp_path / f"{case}.toml", BAD_TOML[case])
    with pytest.raises(MorphonnxError) as info:
        resolve_device(spec)
    _assert_one_line_naming(info.value, f"{case}.toml")


def test_error_messages_say_what_went_wrong(tmp_path: Path) -> None:
    def msg(name: str, text: str) -> str:
        with pytest.raises(MorphonnxError) as info:
            resolve_device(_write(tmp_path / name, text))
        return str(info.value)

    assert "invalid JSON" in msg("a.json", "{")
    assert "invalid TOML" in msg("a.toml", "x = ")
    assert "peak_flops" in msg("b.json", '{"name": "X", "mem_bandwidth": 1}')
    assert "'tdp'" in msg("c.json", '{"name": "X", "peak_flops": 1, "mem_bandwidth": 1, "tdp": 1}')
    assert "positive" in msg("d.json", '{"name": "X", "peak_flops": -1, "mem_bandwidth": 1}')


def test_missing_file(tmp_path: Path) -> None:
    spec = str(tmp_path / "nowhere.toml")
    with pytest.raises(MorphonnxError) as info:
        resolve_device(spec)
    assert "not found" in _assert_one_line_naming(info.value, "nowhere.toml")


def test_unknown_device_lists_builtins() -> None:
    with pytest.raises(MorphonnxError) as info:
        resolve_device("GTX9000")
    msg = _assert_one_line_naming(info.value, "GTX9000")
    for dev in list_devices():
        assert dev.name in msg
    assert ".json" in msg and ".toml" in msg
