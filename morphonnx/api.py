"""The library API: each command's whole flow as one call, for the CLI, adapters and scripts.

The CLI parses arguments, calls these and prints what they return; nothing else runs a pipeline.
Errors are :class:`~morphonnx.errors.MorphonnxError` with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphonnx.analysis import Analysis, analyze
from morphonnx.costs import Totals
from morphonnx.devices import DEFAULT_DEVICES, Device, resolve_device
from morphonnx.errors import MorphonnxError
from morphonnx.formats import write_json
from morphonnx.mask import MaskResult, auto_threshold, check_mask, group_values, load_mask
from morphonnx.mask import make_mask as threshold_mask
from morphonnx.prune import check_pruned, prune_model, save_model
from morphonnx.prune import structure as layer_structure
from morphonnx.spec import build_spec, read_spec
from morphonnx.verify import Verification
from morphonnx.verify import verify as verify_pruned

PathLike = str | os.PathLike[str]


def analyze_file(
    path: PathLike,
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    devices: Sequence[Device | str] = DEFAULT_DEVICES,
) -> Analysis:
    """Load, solve and cost a model; ``devices`` are :class:`Device` objects, built-in names or
    ``.json`` / ``.toml`` profile paths."""
    resolved = [d if isinstance(d, Device) else resolve_device(d) for d in devices]
    return analyze(path, batch=batch, input_shapes=input_shapes, devices=resolved)


def make_spec(model: Analysis | PathLike, **analyze_args: Any) -> dict[str, Any]:
    """The group spec of a model (an :class:`Analysis`, or a file analysed with
    ``analyze_args``), as the document training adapters read."""
    a = model if isinstance(model, Analysis) else analyze_file(model, **analyze_args)
    return build_spec(a)


def make_mask(
    a: Analysis,
    spec: PathLike | Mapping[str, Any],
    *,
    threshold: float | None = None,
    kind: str = "gamma",
    l1_fraction: float = 0.0,
) -> MaskResult:
    """Alive/dead channels of every prunable group from the model's trained weights: a channel
    lives when its regularization value exceeds ``threshold``; without one, the threshold is
    picked in the widest gap of the values (the result's ``note`` says where)."""
    if isinstance(spec, Mapping):
        doc = dict(spec)
        origin = "spec"
    else:
        doc = read_spec(spec, a.fingerprint)
        origin = str(spec)
    values = group_values(a, doc, kind, l1_fraction)
    if not values:
        raise MorphonnxError(f"{origin}: no prunable group has a regularization source")
    note = ""
    if threshold is None:
        threshold, note = auto_threshold(values)
    result = threshold_mask(values, threshold)
    result.note = note
    return result


@dataclass
class PruneReport:
    """What ``prune_file`` did: the mask applied, costs predicted from the analysis and measured
    on the written file, the verification (None when skipped) and the files written."""

    analysis: Analysis
    keep: dict[str, list[bool]]
    predicted: Totals
    measured: Totals
    verification: Verification | None
    structure: dict[str, Any]
    written: list[Path]

    @property
    def kept(self) -> dict[str, int]:
        """Channels kept per group."""
        return {gid: sum(alive) for gid, alive in self.keep.items()}

    @property
    def as_predicted(self) -> bool:
        m, p = self.measured, self.predicted
        return (m.macs, m.params) == (p.macs, p.params)


class VerificationFailed(MorphonnxError):
    """The pruned model differs from the masked original; nothing was written."""

    def __init__(self, message: str, verification: Verification) -> None:
        super().__init__(message)
        self.verification = verification


def prune_file(
    model_path: PathLike,
    mask: PathLike | Mapping[str, Sequence[bool]],
    output: PathLike,
    *,
    verify: bool = True,
    structure: PathLike | None = None,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    devices: Sequence[Device | str] = DEFAULT_DEVICES,
) -> PruneReport:
    """Prune ``model_path`` with ``mask`` (a mask file or ``{group: [alive, ...]}``) and write
    ``output`` (and ``structure``, the kept channels per layer). The written file is checked by
    ``onnx.checker``, verified layer by layer in onnxruntime and analysed again before it takes
    its name: on any failure nothing is written."""
    shapes = dict(input_shapes or {})
    a = analyze_file(model_path, batch=batch, input_shapes=shapes, devices=devices)
    if isinstance(mask, Mapping):
        keep = {gid: list(alive) for gid, alive in mask.items()}
        check_mask(a, "mask", a.fingerprint, keep)
    else:
        keep = load_mask(a, str(mask))
    _, predicted = a.predict(keep)
    layers = layer_structure(a, keep)
    pruned = prune_model(a, keep)
    verification: Verification | None = None
    measured: Totals | None = None

    def check(written: Path) -> None:
        """Runs on the written file before it takes the output's name."""
        nonlocal verification, measured
        check_pruned(written, str(output))
        if verify:
            verification = verify_pruned(a, keep, pruned)
            if not verification.ok:
                raise VerificationFailed(
                    f"{output}: pruned model differs from the masked original "
                    f"({verification.failures[0]}); nothing written",
                    verification,
                )
        measured = analyze(written, batch=batch, input_shapes=shapes, devices=a.devices).totals
        if structure is not None:
            write_json(structure, layers)

    written = save_model(pruned, output, a.graph.path, check)
    assert measured is not None
    if structure is not None:
        written.append(Path(structure))
    return PruneReport(
        analysis=a,
        keep=keep,
        predicted=predicted,
        measured=measured,
        verification=verification,
        structure=layers,
        written=written,
    )
