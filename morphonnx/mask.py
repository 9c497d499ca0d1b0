"""From trained weights to a mask: regularization vectors, threshold, alive/dead per channel.

A threshold that would empty a whole group keeps that group's strongest channel instead (a layer
with no channels is not a smaller network but a broken one); the groups this happened to are
reported, so a user can see the threshold was too high for them.

``round_to=K`` then makes each group's alive count a multiple of K (hardware runs such widths
faster): the nearest multiple (halves round up), at least K, never more than the group has (then
the largest multiple of K that fits, or the whole group when it has fewer than K channels). The
strongest channels are the ones kept: rounding down drops the weakest alive ones, rounding up
revives the strongest dead ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morphonnx.analysis import Analysis
from morphonnx.errors import MorphonnxError
from morphonnx.formats import (
    MASK_FORMAT,
    Attention,
    file_attention,
    mask_document,
    read_mask,
    same_attention,
)
from morphonnx.regularize import NUMPY, group_vector


@dataclass
class MaskResult:
    threshold: float
    keep: dict[str, list[bool]]
    values: dict[str, np.ndarray]
    rescued: list[str] = field(default_factory=list)
    note: str = ""

    def document(self, fp: str, kind: str, attention: Attention = "dims") -> dict[str, Any]:
        """The mask file: for the model of fingerprint ``fp``, grouped as ``attention``."""
        return mask_document(
            fp, self.keep, attention, threshold=self.threshold, kind=kind, rescued=self.rescued
        )


def group_values(
    a: Analysis,
    spec: dict[str, Any],
    kind: str = "gamma",
    l1_fraction: float = 0.0,
    spec_path: str = "spec",
) -> dict[str, np.ndarray]:
    """Regularization vector of every prunable group, read from the model's own weights."""
    values: dict[str, np.ndarray] = {}
    known = {g.id: g for g in a.solution.groups}
    for g in spec["groups"]:
        if not g["prunable"]:
            continue
        mine = known.get(g["id"])
        if mine is None or not mine.prunable or mine.channels != g["channels"]:
            raise MorphonnxError(
                f"{spec_path}: group {g['id']} ({g['channels']} channels, prunable) is not a "
                f"group of {a.graph.path} (was the spec edited?)"
            )
        reg = g["regularize"]
        names = {s["tensor"] for s in reg["gammas"] + reg["weights"]}
        missing = [n for n in names if not a.graph.is_const(n)]
        if missing:
            raise MorphonnxError(
                f"{a.graph.path}: spec tensor '{missing[0]}' of group {g['id']} is not a weight "
                "of this model"
            )
        tensors = {n: a.graph.value(n).astype(np.float64) for n in names}
        for s in reg["gammas"] + reg["weights"]:
            shape = tensors[s["tensor"]].shape
            if not (
                0 <= s["axis"] < len(shape)
                and all(0 <= i < shape[s["axis"]] for p in s["positions"] for i in p)
            ):
                raise MorphonnxError(
                    f"{a.graph.path}: spec positions of '{s['tensor']}' (group {g['id']}) do not "
                    f"fit its shape {list(shape)}"
                )
        vec = group_vector(NUMPY, g, tensors, kind, l1_fraction)
        if vec is not None:
            values[g["id"]] = np.asarray(vec)
    return values


def auto_threshold(values: dict[str, np.ndarray]) -> tuple[float, str]:
    """The threshold in the widest gap of the log-scaled values (MorphNet's bimodal picture).

    With no gap of at least half a decade the distribution is not bimodal (training has not
    separated dead from alive channels): the threshold then keeps everything, and says so.
    """
    allv = np.sort(np.concatenate([v.reshape(-1) for v in values.values()]) if values else [])
    # below every value (values are magnitudes, >= 0): a channel lives when value > threshold
    keep_all = float(allv[0]) * 0.5 if len(allv) and allv[0] > 0 else -1.0
    if len(allv) < 2:
        return keep_all, "too few channels to pick a threshold; keeping all"
    logs = np.log10(np.maximum(allv, 1e-12))
    gaps = np.diff(logs)
    i = int(np.argmax(gaps))
    if gaps[i] < 0.5:
        return keep_all, (
            f"no gap of half a decade in the values (widest {gaps[i]:.2f} decades); keeping all"
        )
    t = float(10 ** ((logs[i] + logs[i + 1]) / 2))
    return t, (
        f"threshold {t:.3g} in the widest gap ({allv[i]:.3g} .. {allv[i + 1]:.3g}, "
        f"{gaps[i]:.2f} decades): {i + 1} of {len(allv)} channels below"
    )


def rounded_count(alive: int, channels: int, k: int) -> int:
    """``alive`` to the nearest multiple of ``k`` (halves up), at least ``k``, at most what fits
    in ``channels`` (all of them when fewer than ``k``)."""
    n = max(k, (2 * alive + k) // (2 * k) * k)
    if n > channels:
        n = channels // k * k or channels
    return n


def strongest(vec: np.ndarray, n: int) -> np.ndarray:
    """Alive flags of the ``n`` largest values of ``vec`` (ties: the lower index)."""
    order = np.argsort(-vec, kind="stable")
    alive = np.zeros(len(vec), dtype=bool)
    alive[order[:n]] = True
    return alive


def make_mask(
    values: dict[str, np.ndarray], threshold: float, round_to: int | None = None
) -> MaskResult:
    """Alive channels: value above ``threshold`` (a group never empties), and with ``round_to``
    a multiple of it per group (see the module notes)."""
    if round_to is not None and round_to < 1:
        raise MorphonnxError(f"--round-to must be 1 or more, got {round_to}")
    keep: dict[str, list[bool]] = {}
    rescued: list[str] = []
    for gid, vec in values.items():
        alive = vec > threshold
        if not alive.any():
            alive[int(np.argmax(vec))] = True
            rescued.append(gid)
        if round_to is not None:
            alive = strongest(vec, rounded_count(int(alive.sum()), len(vec), round_to))
        keep[gid] = alive.tolist()
    return MaskResult(threshold, keep, values, rescued)


def check_mask(
    a: Analysis,
    path: str,
    fp: str,
    groups: dict[str, list[bool]],
    attention: Attention | None = None,
) -> None:
    """Refuse a mask that does not fit this model (or, with ``attention``, the grouping it was
    made with differs from the analysis's), naming the first problem."""
    if fp != a.fingerprint:
        raise MorphonnxError(
            f"{path}: mask was made for another model (fingerprint {fp} != {a.fingerprint})"
        )
    if attention is not None:
        same_attention(attention, a.attention, path)
    known = {g.id: g for g in a.solution.groups}
    for gid, keep in groups.items():
        g = known.get(gid)
        if g is None:
            raise MorphonnxError(f"{path}: unknown group '{gid}'")
        if not g.prunable:
            raise MorphonnxError(f"{path}: group '{gid}' is not prunable ({g.reason})")
        if len(keep) != g.channels:
            raise MorphonnxError(
                f"{path}: group '{gid}' has {g.channels} channels, the mask lists {len(keep)}"
            )
        if not any(keep):
            raise MorphonnxError(f"{path}: group '{gid}' keeps no channel")


def load_mask(a: Analysis, path: str) -> dict[str, list[bool]]:
    """A mask file's groups, refused unless made for this model and its attention grouping."""
    fp, groups = read_mask(path)
    check_mask(a, path, fp, groups, file_attention(path, MASK_FORMAT))
    return groups
