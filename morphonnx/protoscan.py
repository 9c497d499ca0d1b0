"""Read an ONNX file without copying its weights: the graph is parsed, weight bytes stay on disk.

``onnx.load`` copies every weight into the process (and ``infer_shapes`` serializes them again).
Analysis needs only names, shapes and dtypes, so this reader walks the protobuf wire format, drops
the ``raw_data`` of every initializer before parsing, and remembers where those bytes lie in a
memory-mapped file. Values are read on demand as zero-copy numpy views (``weight``), and
``restore_weights`` puts the bytes back into a proto before it is saved.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

# field numbers of onnx.proto
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_NAME = 8


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):  # type: ignore[no-untyped-def]
    """Yield (field number, wire type, field start, value start, value end) of one message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos, end)
            yield number, wire, field_start, pos, nxt
            pos = nxt
        elif wire == 1:
            yield number, wire, field_start, pos, pos + 8
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError("truncated field")
            yield number, wire, field_start, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, wire, field_start, pos, pos + 4
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("truncated message")


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


@dataclass
class LazyWeights:
    """Where each stripped initializer's raw bytes lie in the mapped file."""

    mapped: mmap.mmap | None
    spans: dict[str, tuple[int, int]]

    def raw(self, name: str) -> bytes:
        assert self.mapped is not None
        start, end = self.spans[name]
        return self.mapped[start:end]

    def weight(self, tensor: onnx.TensorProto) -> np.ndarray:
        """Values of a stripped initializer, a read-only view on the mapped file."""
        assert self.mapped is not None
        start, end = self.spans[tensor.name]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        arr = np.frombuffer(
            self.mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start
        )
        return arr.reshape(tuple(tensor.dims))

    def restore(self, model: onnx.ModelProto) -> None:
        """Put the raw bytes back into every stripped initializer that still lacks data."""
        for t in model.graph.initializer:
            if (
                t.name in self.spans
                and not t.raw_data
                and t.data_location != onnx.TensorProto.EXTERNAL
            ):
                if not _has_typed_data(t):
                    t.raw_data = self.raw(t.name)


def _has_typed_data(t: onnx.TensorProto) -> bool:
    return bool(
        t.float_data
        or t.int32_data
        or t.int64_data
        or t.double_data
        or t.uint64_data
        or t.string_data
    )


def read_stripped(path: Path, keep_below: int = 8192) -> tuple[onnx.ModelProto, LazyWeights]:
    """The model with the ``raw_data`` of every initializer of ``keep_below`` bytes or more left
    on disk (see module docstring); small ones (shape vectors, axes) are parsed as usual."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise WireError("empty file")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mapped)
    spans: dict[str, tuple[int, int]] = {}
    parts: list[bytes] = []
    try:
        for number, _wire, fstart, vstart, vend in _fields(buf, 0, len(buf)):
            if number != MODEL_GRAPH:
                parts.append(bytes(buf[fstart:vend]))
                continue
            graph_parts: list[bytes] = []
            for gnum, _gw, gfs, gvs, gve in _fields(buf, vstart, vend):
                if gnum != GRAPH_INITIALIZER:
                    graph_parts.append(bytes(buf[gfs:gve]))
                    continue
                kept: list[bytes] = []
                raw: tuple[int, int] | None = None
                name = ""
                for tnum, _tw, tfs, tvs, tve in _fields(buf, gvs, gve):
                    if tnum == TENSOR_RAW_DATA and tve - tvs >= keep_below:
                        raw = (tvs, tve)
                        continue
                    if tnum == TENSOR_NAME:
                        name = bytes(buf[tvs:tve]).decode("utf-8", "replace")
                    kept.append(bytes(buf[tfs:tve]))
                if raw is not None and name not in spans:
                    spans[name] = raw
                graph_parts.append(_len_field(GRAPH_INITIALIZER, b"".join(kept)))
            parts.append(_len_field(MODEL_GRAPH, b"".join(graph_parts)))
    finally:
        buf.release()
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(parts))
    return model, LazyWeights(mapped, spans)
