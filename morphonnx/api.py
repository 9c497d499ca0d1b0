"""The library API: each command's whole flow as one call, for the CLI, adapters and scripts.

The CLI parses arguments, calls these and prints what they return; nothing else runs a pipeline.
Errors are :class:`~morphonnx.errors.MorphonnxError` with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morphonnx import foldconst
from morphonnx.analysis import Analysis, analyze
from morphonnx.costs import Totals
from morphonnx.devices import DEFAULT_DEVICES, Device, resolve_devices
from morphonnx.errors import MorphonnxError
from morphonnx.formats import (
    MASK_FORMAT,
    Attention,
    check_attention,
    file_attention,
    recorded_attention,
    same_attention,
    write_json,
)
from morphonnx.mask import MaskResult, auto_threshold, check_mask, group_values, load_mask
from morphonnx.mask import make_mask as threshold_mask
from morphonnx.prune import check_pruned, prune_model, save_model
from morphonnx.prune import structure as layer_structure
from morphonnx.spec import build_spec, read_spec
from morphonnx.verify import Verification, random_feeds
from morphonnx.verify import verify as verify_pruned

PathLike = str | os.PathLike[str]


def analyze_file(
    path: PathLike,
    *,
    batch: int = 1,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    devices: Sequence[Device | str] = DEFAULT_DEVICES,
    check_rewrites: bool = True,
    attention: Attention = "dims",
) -> Analysis:
    """Load, solve and cost a model; ``devices`` are :class:`Device` objects, built-in names or
    ``.json`` / ``.toml`` profile paths. ``check_rewrites``: dry-run the rewrite of every group
    found prunable (``selfcheck``) and report those that fail unprunable, so that a group
    called prunable prunes. ``attention``: ``"dims"`` groups attention per head dim (the same
    dims in every head), ``"heads"`` by whole heads; specs and masks record it."""
    from morphonnx.selfcheck import self_check

    resolved = resolve_devices(devices)
    a = analyze(path, batch=batch, input_shapes=input_shapes, devices=resolved, attention=attention)
    if check_rewrites:
        self_check(a)
    return a


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
    round_to: int | None = None,
) -> MaskResult:
    """Alive/dead channels of every prunable group from the model's trained weights: a channel
    lives when its regularization value exceeds ``threshold``; without one, the threshold is
    picked in the widest gap of the values (the result's ``note`` says where). ``round_to=K``:
    alive counts to multiples of K, keeping the strongest channels (``morphonnx.mask``). The
    spec must have been made with ``a``'s attention grouping."""
    if isinstance(spec, Mapping):
        doc = dict(spec)
        origin = "spec"
    else:
        doc = read_spec(spec, a.fingerprint)
        origin = str(spec)
    same_attention(recorded_attention(doc, origin), a.attention, origin)
    values = group_values(a, doc, kind, l1_fraction, origin)
    if not values:
        raise MorphonnxError(f"{origin}: no prunable group has a regularization source")
    note = ""
    if threshold is None:
        threshold, note = auto_threshold(values)
    result = threshold_mask(values, threshold, round_to)
    result.note = note
    return result


@dataclass
class PruneReport:
    """What ``prune_file`` did: the mask applied, costs predicted from the analysis and measured
    on the written file, the verification (None when skipped), the files written; with
    ``fold_constants`` the fold, and (also with calibration data) the deviation of each graph
    output from the original's, per set of inputs."""

    analysis: Analysis
    keep: dict[str, list[bool]]
    predicted: Totals
    measured: Totals
    verification: Verification | None
    structure: dict[str, Any]
    written: list[Path]
    fold: foldconst.FoldPlan | None = None
    deviation: list[tuple[str, dict[str, float]]] = field(default_factory=list)

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
    fold_constants: bool = False,
    kind: str | None = None,
    calibration: PathLike | None = None,
    attention: Attention | None = None,
) -> PruneReport:
    """Prune ``model_path`` with ``mask`` (a mask file or ``{group: [alive, ...]}``) and write
    ``output`` (and ``structure``, the kept channels per layer). The written file is checked by
    ``onnx.checker``, verified layer by layer in onnxruntime and analysed again before it takes
    its name: on any failure nothing is written.

    ``fold_constants``: each dead channel's constant output is folded into the layers it reaches
    (:mod:`morphonnx.foldconst`); the reference is then the original with only the dead channels'
    regularized parameters zeroed (``kind``: the mask's regularizer, default the mask file's
    ``kind`` or ``gamma``). ``calibration``: an ``.npz`` of inputs on which the deviation from
    the original is measured (random inputs are always used with the fold). ``attention``: the
    grouping of the mask's groups, by default the mask file's (``"dims"`` for a dict); one that
    differs from the file's is refused."""
    shapes = dict(input_shapes or {})
    if isinstance(mask, Mapping):
        grouping = check_attention(attention or "dims")
    else:
        grouping = same_attention(file_attention(mask, MASK_FORMAT), attention, mask)
    a = analyze_file(
        model_path, batch=batch, input_shapes=shapes, devices=devices, attention=grouping
    )
    if isinstance(mask, Mapping):
        keep = {gid: list(alive) for gid, alive in mask.items()}
        check_mask(a, "mask", a.fingerprint, keep)
    else:
        keep = load_mask(a, str(mask))
    if kind is None:
        kind = "gamma" if isinstance(mask, Mapping) else foldconst.mask_kind(mask)
    inputs = [("random inputs", random_feeds(a))] if fold_constants else []
    if calibration is not None:
        inputs.append((str(calibration), foldconst.read_calibration(calibration, a)))
    _, predicted = a.predict(keep)
    layers = layer_structure(a, keep)
    fold = foldconst.plan_fold(a, keep, kind) if fold_constants else None
    pruned = prune_model(a, keep)
    if fold is not None:
        foldconst.apply_fold(pruned, fold)
    verification: Verification | None = None
    measured: Totals | None = None
    deviation: list[tuple[str, dict[str, float]]] = []

    def check(written: Path) -> None:
        """Runs on the written file before it takes the output's name."""
        nonlocal verification, measured
        check_pruned(written, str(output))
        if verify:
            if fold is None:
                verification = verify_pruned(a, keep, pruned)
            else:
                reference = foldconst.scale_zeroed(a, keep, kind)
                inexact = foldconst.inexact_tensors(a, fold)
                verification = verify_pruned(a, keep, pruned, reference=reference, inexact=inexact)
            if not verification.ok:
                what = "masked original" if fold is None else "original with dead scales zeroed"
                raise VerificationFailed(
                    f"{output}: pruned model differs from the {what} "
                    f"({verification.failures[0]}); nothing written",
                    verification,
                )
        for name, feeds in inputs:
            deviation.append((name, foldconst.output_deviation(a.graph.path, written, feeds, name)))
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
        fold=fold,
        deviation=deviation,
    )
