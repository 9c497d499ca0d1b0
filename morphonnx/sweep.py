"""How well each cost model ranks real latency: random-width variants, measured (``sweep``).

Every variant is a random mask over the prunable groups (each group keeps a random fraction of its
channels, at random), pruned with the same rewriter as ``prune`` (onnx.checker on; the layer-by-
layer verification is left out for speed: ``prune`` tests it) and timed in onnxruntime with the
optimizations a deployment uses, each run alternating with a run of the original model: the median
ratio variant / original is what is ranked, so a machine whose load changes during the sweep (other
processes) shifts every variant alike. The predictors (FLOPs, parameters, roofline latency on each
device) are compared with it by Spearman rank correlation: what matters when a cost steers pruning
is that it orders structures as the hardware does.

The CSV is rewritten whole (atomically) after each variant, so a run that is stopped resumes from
it: variants already present are skipped. Masks depend on the seed and the variant number only.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from morphonnx.analysis import Analysis, analyze
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError
from morphonnx.formats import Attention, write_text
from morphonnx.mask import rounded_count
from morphonnx.prune import check_pruned, prune_model, save_model
from morphonnx.runtime import RunConfig, random_feeds, session, time_pairs

Keep = dict[str, list[bool]]
Timed = tuple[ort.InferenceSession, dict[str, np.ndarray]]
MIN_FRACTION = 0.2
"""A variant's group keeps between this fraction and all of its channels."""


@dataclass(frozen=True)
class SweepSetup:
    model: str
    seed: int
    devices: tuple[Device, ...]
    config: RunConfig
    batch: int = 1
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    round_to: int | None = None  # widths multiples of this (as ``mask --round-to``)
    attention: Attention = "dims"  # attention grouped per head dim or by whole heads

    def columns(self) -> list[str]:
        lat = [f"latency_{d.name}_s" for d in self.devices]
        first = ["variant", "seed", "round_to", "attention", "model_fingerprint", "kept_fraction"]
        return (
            first
            + ["flops", "params"]
            + [
                *lat,
                "measured_s",
                "relative",
            ]
        )

    def predictors(self) -> list[str]:
        """The CSV columns compared with the measured ``relative`` latency."""
        return ["flops", "params"] + [f"latency_{d.name}_s" for d in self.devices]

    def analyze(self) -> Analysis:
        shapes = {k: list(v) for k, v in self.input_shapes}
        return analyze(
            self.model,
            batch=self.batch,
            input_shapes=shapes,
            devices=list(self.devices),
            attention=self.attention,
        )


Row = dict[str, str]


def random_masks(a: Analysis, n: int, seed: int, round_to: int | None = None) -> list[Keep]:
    """``n`` distinct random masks: each prunable group keeps a uniform random fraction (at least
    :data:`MIN_FRACTION`) of its channels, chosen at random (with ``round_to``, the count rounded
    as ``mask --round-to`` does). Mask ``i`` depends on ``seed`` and the masks before it only, so a
    resumed sweep redraws the same ones."""
    groups = [g for g in a.solution.groups if g.prunable]
    if not groups:
        raise MorphonnxError(f"{a.graph.path}: no prunable group to vary")
    masks: list[Keep] = []
    seen: set[tuple[tuple[bool, ...], ...]] = set()
    for i in range(n):
        for attempt in range(100):
            rng = np.random.default_rng([seed, i, attempt])
            keep: Keep = {}
            for g in groups:
                count = max(1, round(rng.uniform(MIN_FRACTION, 1.0) * g.channels))
                if round_to is not None:
                    count = rounded_count(count, g.channels, round_to)
                alive = np.zeros(g.channels, dtype=bool)
                alive[rng.choice(g.channels, count, replace=False)] = True
                keep[g.id] = alive.tolist()
            key = tuple(tuple(k) for k in keep.values())
            if key not in seen:
                break
        else:
            raise MorphonnxError(
                f"{a.graph.path}: only {len(masks)} distinct widths found; ask for fewer variants"
            )
        seen.add(key)
        masks.append(keep)
    return masks


def read_rows(path: Path, setup: SweepSetup, fp: str) -> list[Row]:
    """Rows of an earlier run of the same sweep; refuse a CSV of another model, seed, width
    rounding, attention grouping or devices."""
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MorphonnxError(f"{path}: cannot read the earlier sweep ({exc})") from None
    if header != setup.columns():
        raise MorphonnxError(
            f"{path}: written by a sweep with other columns (devices, or an older morphonnx); "
            "use another -o file"
        )
    for r in rows:
        mine = (fp, str(setup.seed), _rt(setup), setup.attention)
        if (r["model_fingerprint"], r["seed"], r["round_to"], r["attention"]) != mine:
            raise MorphonnxError(
                f"{path}: written for another model or seed (fingerprint "
                f"{r['model_fingerprint']}, seed {r['seed']}, round_to {r['round_to'] or '-'}, "
                f"attention {r['attention']}); use another -o file"
            )
    return rows


def _rt(setup: SweepSetup) -> str:
    return str(setup.round_to or "")


def write_rows(path: Path, setup: SweepSetup, rows: Sequence[Row]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=setup.columns(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: int(r["variant"])))
    text = buf.getvalue()
    write_text(path, text)


def measure_variant(
    a: Analysis, setup: SweepSetup, keep: Keep, out: Path, reference: Timed
) -> tuple[float, float]:
    """Prune the model with ``keep`` into ``out`` (checked) and time it against the original:
    (median seconds, median ratio to the original's adjacent runs)."""
    save_model(prune_model(a, keep), out, a.graph.path, lambda p: check_pruned(p, str(out)))
    variant = timed_session(out, setup.config, reference[1])
    mine, theirs = time_pairs(variant, reference, setup.config.warmup, setup.config.repeats)
    ratios = [m / t for m, t in zip(mine, theirs, strict=True)]
    return statistics.median(mine), statistics.median(ratios)


def timed_session(
    model: str | Path,
    config: RunConfig,
    feeds: dict[str, np.ndarray] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Timed:
    sess = session(model, config.threads)
    return sess, feeds if feeds is not None else random_feeds(sess, shapes)


def run_sweep(
    setup: SweepSetup,
    n: int,
    csv_path: Path,
    models_dir: Path | None = None,
    on_variant: Callable[[int, int], None] | None = None,
) -> list[Row]:
    """Measure ``n`` variants into ``csv_path`` (resuming it); ``models_dir`` keeps the pruned
    models (``variant_000.onnx``...). ``on_variant(done, total)`` reports progress."""
    a = setup.analyze()
    rows = read_rows(csv_path, setup, a.fingerprint)
    done = {int(r["variant"]) for r in rows}
    masks = random_masks(a, n, setup.seed, setup.round_to)
    prunable = sum(g.channels for g in a.solution.groups if g.prunable)
    shapes = {name: a.graph.shape(name) or () for name in a.graph.inputs}
    reference = timed_session(setup.model, setup.config, shapes=shapes)
    with tempfile.TemporaryDirectory(prefix="morphonnx-sweep-") as tmp:
        folder = models_dir or Path(tmp)
        for i, keep in enumerate(masks):
            if on_variant is not None:
                on_variant(len([d for d in done if d < n]), n)
            if i in done:
                continue
            _, predicted = a.predict(keep)
            out = folder / f"variant_{i:03d}.onnx"
            measured, relative = measure_variant(a, setup, keep, out, reference)
            kept = sum(sum(k) for k in keep.values())
            row: Row = {
                "variant": str(i),
                "seed": str(setup.seed),
                "round_to": _rt(setup),
                "attention": setup.attention,
                "model_fingerprint": a.fingerprint,
                "kept_fraction": f"{kept / prunable:.6g}",
                "flops": str(predicted.flops),
                "params": str(predicted.params),
                "measured_s": repr(measured),
                "relative": repr(relative),
            }
            row.update(
                {f"latency_{d.name}_s": repr(predicted.latency[d.name]) for d in setup.devices}
            )
            rows.append(row)
            done.add(i)
            write_rows(csv_path, setup, rows)
        if on_variant is not None:
            on_variant(len([d for d in done if d < n]), n)
    return sorted((r for r in rows if int(r["variant"]) < n), key=lambda r: int(r["variant"]))


def ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's definition needs)."""
    arr = np.asarray(x, dtype=float)
    order = np.argsort(arr, kind="stable")
    result = np.empty(len(arr))
    sorted_vals = arr[order]
    i = 0
    while i < len(arr):
        j = i
        while j + 1 < len(arr) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        result[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson correlation of the ranks); None when undefined (fewer
    than two points, or one side constant)."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denom = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
    return float(np.sum(rx * ry)) / denom if denom > 0 else None


def correlations(setup: SweepSetup, rows: Sequence[Row]) -> dict[str, float | None]:
    """Spearman correlation of each predictor column with the measured (relative) latency."""
    measured = [float(r["relative"]) for r in rows]
    return {p: spearman([float(r[p]) for r in rows], measured) for p in setup.predictors()}


def column(rows: Sequence[Row], name: str) -> list[float]:
    return [float(r[name]) for r in rows]


def shapes_tuple(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((k, tuple(v)) for k, v in shapes.items())
