"""The files users and adapters exchange: structural fingerprint, group spec, mask, atomic writes.

Field names are documented in ``docs/formats.md`` (the *contract* ones are promised to adapters);
add fields freely, never rename or drop one without bumping the format version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import onnx
import onnx.numpy_helper

from morphonnx.errors import MorphonnxError

SPEC_FORMAT = "morphonnx.spec"
MASK_FORMAT = "morphonnx.mask"
VERSION = 1

Attention = Literal["dims", "heads"]
"""How attention heads are grouped (``--attention``): ``dims``, per head dim (the same dims in
every head; the default), or ``heads``, whole heads. Specs and masks record it."""
ATTENTION: tuple[Attention, ...] = get_args(Attention)


def check_attention(value: object, where: str = "attention") -> Attention:
    """``value`` as an :data:`Attention` grouping; anything else is refused, naming ``where``."""
    for known in ATTENTION:
        if value == known:
            return known
    raise MorphonnxError(f"{where}: {value!r} is not an attention grouping (dims or heads)")


def recorded_attention(doc: dict[str, Any], path: str | os.PathLike[str]) -> Attention:
    """The grouping a spec or mask was made with (``dims`` for files without the field)."""
    return check_attention(doc.get("attention", "dims"), f"{os.fspath(path)}: 'attention'")


def file_attention(path: str | os.PathLike[str], expected_format: str) -> Attention:
    """The attention grouping a spec or mask file was made with."""
    return recorded_attention(read_json(path, expected_format), path)


def same_attention(
    recorded: Attention, wanted: str | None, path: str | os.PathLike[str]
) -> Attention:
    """The grouping a spec or mask file was made with, which its user must analyse with: an
    explicit ``wanted`` (``--attention``) that differs is refused (the groups would differ)."""
    if wanted is not None and check_attention(wanted) != recorded:
        raise MorphonnxError(
            f"{os.fspath(path)}: made with attention '{recorded}', not '{wanted}' (its groups "
            f"are those of --attention {recorded})"
        )
    return recorded


def fingerprint(model: onnx.ModelProto) -> str:
    """A hash of the graph's structure, never of weight values: op types, attributes, tensor
    names, declared shapes and dtypes, initializer names/shapes/dtypes, and the values of small
    integer constants (Reshape targets, Slice bounds, axes: structure, not weights). A spec made
    before training therefore matches the export after training, and nothing else."""
    h = hashlib.sha256()

    def structural(t: onnx.TensorProto) -> tuple[object, ...]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type else None
        small = dtype is not None and dtype.kind in "iub" and math.prod(t.dims) <= 64
        small = small and t.data_location != onnx.TensorProto.EXTERNAL
        values = onnx.numpy_helper.to_array(t).reshape(-1).tolist() if small else ()
        return (t.data_type, *t.dims, "=", values)

    def put(*parts: object) -> None:
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\x00")

    def graph(g: onnx.GraphProto) -> None:
        for n in g.node:
            put("node", n.domain, n.op_type, *n.input, "->", *n.output)
            for a in n.attribute:
                attribute(a)
        for t in g.initializer:
            put("init", t.name, *structural(t))
        for vi in list(g.input) + list(g.output):
            put("io", vi.name, vi.type.SerializeToString())

    def attribute(a: onnx.AttributeProto) -> None:
        if a.type == onnx.AttributeProto.TENSOR:
            put("attr", a.name, *structural(a.t))
        elif a.type == onnx.AttributeProto.GRAPH:
            put("attr", a.name)
            graph(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            put("attr", a.name)
            for g in a.graphs:
                graph(g)
        elif a.type == onnx.AttributeProto.TENSORS:
            put("attr", a.name, *[structural(t) for t in a.tensors])
        else:
            put("attr", a.name, onnx.helper.get_attribute_value(a))

    for o in model.opset_import:
        put("opset", o.domain, o.version)
    graph(model.graph)
    return h.hexdigest()[:32]


def check_output(path: str | os.PathLike[str]) -> Path:
    """``path`` as an output: a name in an existing folder that is free or holds a regular file.

    Anything else is refused and never replaced: a folder, a device (``/dev/null``), a FIFO, a
    socket, or a symbolic link (even to a regular file: replacing the link would silently
    detach it, writing through it would put the file, and external data, somewhere else)."""
    if not os.fspath(path):
        raise MorphonnxError("'': empty output file name")
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise MorphonnxError(f"{target}: cannot write ({exc.strerror or exc})") from None
    if mode is not None and stat.S_ISLNK(mode):
        raise MorphonnxError(f"{target}: is a symbolic link; give the path of a regular file")
    if mode is not None and stat.S_ISDIR(mode):
        raise MorphonnxError(f"{target}: is a folder, expected a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise MorphonnxError(f"{target}: is not a regular file (device, FIFO or socket)")
    if not parent.is_dir():
        raise MorphonnxError(f"{target}: folder {parent} does not exist")
    return target


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and move it into place only if
    ``write`` succeeds: a failed command never leaves a half-written or clobbered output, and
    nothing but a regular file is ever replaced (:func:`check_output`)."""
    target = check_output(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise MorphonnxError(f"{target}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:  # on disk before it takes the name (a crash, a power cut)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        check_output(target)  # still free or a regular file: something may have appeared
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MorphonnxError(f"{target}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Strict JSON (``allow_nan=False``: a NaN or infinity is a bug upstream, not a value)."""
    write_bytes(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    def write(p: Path) -> None:
        p.write_bytes(data)

    atomic_write(path, write)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (profiles, CSV)."""

    def write(p: Path) -> None:
        p.write_text(text)

    atomic_write(path, write)


def read_json(path: str | os.PathLike[str], expected_format: str) -> dict[str, Any]:
    """Read a spec or mask, refusing anything that is not that format's current version."""
    p = Path(path)
    if not p.is_file():
        raise MorphonnxError(f"{p}: file not found")
    try:
        data = json.loads(p.read_bytes())
    except OSError as exc:
        raise MorphonnxError(f"{p}: cannot read file ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MorphonnxError(f"{p}: not valid JSON ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise MorphonnxError(f"{p}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        raise MorphonnxError(f"{p}: not a {expected_format} file (format field missing or wrong)")
    if data.get("version") != VERSION:
        raise MorphonnxError(f"{p}: unsupported {expected_format} version {data.get('version')!r}")
    return data


def read_mask(path: str | os.PathLike[str]) -> tuple[str, dict[str, list[bool]]]:
    """A mask file's fingerprint and groups, with the shape of each entry checked (its
    attention grouping: :func:`file_attention`)."""
    data = read_json(path, MASK_FORMAT)
    fp, groups = data.get("model_fingerprint"), data.get("groups")
    if not isinstance(fp, str) or not isinstance(groups, dict):
        raise MorphonnxError(f"{path}: mask needs 'model_fingerprint' and a 'groups' object")
    for gid, keep in groups.items():
        if not isinstance(keep, list) or not all(isinstance(k, bool) for k in keep):
            raise MorphonnxError(f"{path}: group '{gid}' must be a list of true/false")
    recorded_attention(data, path)
    return fp, groups


def mask_document(
    fp: str, groups: dict[str, list[bool]], attention: Attention = "dims", **extra: Any
) -> dict[str, Any]:
    return {
        "format": MASK_FORMAT,
        "version": VERSION,
        "model_fingerprint": fp,
        "attention": attention,
        "groups": groups,
        **extra,
    }
