#!/usr/bin/env python
"""Which cost ranks measured latency best: FLOPs, params, the built-in roofline, or this machine's
calibrated profile? (``morphonnx calibrate`` + ``morphonnx sweep`` on two real-sized models.)

Usage::

    python benchmarks/bench_latency.py                 # 30 variants per model, ~20 minutes
    python benchmarks/bench_latency.py --variants 10 --quick
    python benchmarks/bench_latency.py --plot-dir docs/img --json latency.json

Steps: calibrate this machine (one thread by default), then sweep random-width variants of
MobileNetV2 (224x224) and ResNet-50 (224x224), both written in plain torch and exported
(``benchmarks/models.py``), once with any widths and once with widths that are multiples of 8
(``--round-to``; onnxruntime's fast blocked conv kernels want such widths). Each variant is
pruned with the real rewriter and timed in onnxruntime (warm-up, median of repeats, each run
alternating with one of the original model), and each sweep is measured ``--measurements`` times
(default 2). Reported: Spearman rank correlation of each predictor with the measured latency
relative to the original (the geometric mean of the measurements), and of the mean of the
odd-numbered measurements with that of the even-numbered ones ("measured again": how much ranking
the measurement itself can resolve; predictors ranking near or above it differ by less than this
machine can tell). Goal: the calibrated profile ranks latency better (higher Spearman) than FLOPs
on both models. Also reported, on the same measurements: the calibrated profile without its
efficiency curves and fused ops (one peak per op kind, as ``calibrate`` wrote before them), so
what those terms add is seen without new noise.
Then what a ranking over random widths hides: ``--pairs`` variants with widths that are multiples
of 8, each timed against itself with one channel fewer in every group (FLOPs about 2% lower, every
channel count off the multiple): the ratio each predictor gives and the measured one.
Other processes sharing the CPU make single timings noisy: medians, ratios to the original and a
rank statistic absorb much of it, not all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import CACHE_DIR, ensure_cache_dir, mobilenet_v2_path, resnet50_path  # noqa: E402
from morphonnx.calibrate import calibrate  # noqa: E402
from morphonnx.devices import BUILTIN, profile_toml, resolve_device  # noqa: E402
from morphonnx.plots import plot_sweep  # noqa: E402
from morphonnx.runtime import RunConfig  # noqa: E402
from morphonnx.sweep import (  # noqa: E402
    Keep,
    SweepSetup,
    column,
    measure_variant,
    random_masks,
    run_sweep,
    spearman,
    timed_session,
)

MODELS = {"mobilenet_v2": mobilenet_v2_path, "resnet50": resnet50_path}


def geometric_mean(measured: list[list[float]]) -> list[float]:
    """Per variant, the geometric mean of its measured latency ratios."""
    return np.exp(np.mean(np.log(measured), axis=0)).tolist()


def progress(label: str) -> Callable[[int, int], None]:
    """Prints ``label: done/total`` over itself as a sweep goes."""

    def show(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="", flush=True)

    return show


def one_fewer(keep: Keep) -> Keep:
    """``keep`` with its last alive channel dropped in every group that keeps more than one."""
    fewer = {}
    for gid, alive in keep.items():
        alive = list(alive)
        kept = [i for i, a in enumerate(alive) if a]
        if len(kept) > 1:
            alive[kept[-1]] = False
        fewer[gid] = alive
    return fewer


def alignment_pairs(setup: SweepSetup, n: int) -> list[dict[str, float]]:
    """For ``n`` variants with widths multiples of 8 (seeds apart from the sweeps'), the ratio of
    the variant with one channel fewer per group to the variant itself: by each predictor of
    ``setup`` and measured (median of alternating runs of the two)."""
    a = setup.analyze()
    shapes = {name: a.graph.shape(name) or () for name in a.graph.inputs}
    original = timed_session(setup.model, setup.config, shapes=shapes)
    pairs = []
    with tempfile.TemporaryDirectory(prefix="morphonnx-pairs-") as tmp:
        aligned, off = Path(tmp) / "aligned.onnx", Path(tmp) / "off.onnx"
        for keep in random_masks(a, n, setup.seed + 1, 8):
            fewer = one_fewer(keep)
            measure_variant(a, setup, keep, aligned, original)
            _, measured = measure_variant(
                a, setup, fewer, off, timed_session(aligned, setup.config)
            )
            before, after = a.predict(keep)[1], a.predict(fewer)[1]
            ratio = {"flops": (after.flops or 0) / (before.flops or 1)}
            for d in setup.devices:
                ratio[f"latency_{d.name}_s"] = (after.latency[d.name] or 0) / (
                    before.latency[d.name] or 1
                )
            pairs.append({**ratio, "measured": measured})
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=30)
    ap.add_argument(
        "--repeats",
        type=int,
        default=15,
        help="timed runs per variant (median; fewer leave the ranking to the noise of a shared "
        "machine)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime threads (default 1: on a shared machine a thread pool measures the "
        "scheduler more than the model; 0 = onnxruntime's default)",
    )
    ap.add_argument("--quick", action="store_true", help="quick calibration")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--plot-dir", type=Path, help="write sweep_<model>.png here")
    ap.add_argument("--json", type=Path, help="write the correlations as JSON")
    ap.add_argument(
        "--round-to",
        type=int,
        nargs="*",
        default=[8],
        help="also sweep widths that are multiples of K (default 8; none: random widths only)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="continue the cached CSVs and profile of a last run"
    )
    ap.add_argument(
        "--measurements",
        type=int,
        default=2,
        help="measure each sweep this many times (default 2): predictors are ranked against the "
        "geometric mean of all, and the mean of the odd-numbered measurements against that of the "
        "even-numbered ones says how reproducible the measurement is",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=3,
        help="variants timed against themselves with one channel fewer per group (default 3)",
    )
    args = ap.parse_args()

    cache = ensure_cache_dir(CACHE_DIR)
    profile = cache / "this-machine.toml"
    if args.resume and profile.exists():
        d = resolve_device(str(profile))
    else:
        d = calibrate("this-machine", args.threads, args.quick).device
        profile.write_text(profile_toml(d))
    print(
        f"calibrated: dense conv {d.peak('conv') / 1e9:.1f} GFLOP/s, depthwise "
        f"{d.peak('depthwise') / 1e9:.1f} GFLOP/s, gemm {d.peak('gemm') / 1e9:.1f} GFLOP/s, "
        f"bandwidth {d.mem_bandwidth / 1e9:.1f} GB/s, per-op overhead {d.overhead * 1e6:.2f} us, "
        f"curves {dict(d.curves)}, fused {list(d.fused_ops)}"
    )
    flat = dataclasses.replace(d, name="one-peak", curves=(), fused_ops=())
    config = RunConfig(threads=args.threads, warmup=1, repeats=args.repeats)
    results: dict[str, dict[str, float | None]] = {}
    off_by_one: dict[str, list[dict[str, float]]] = {}
    for name in args.models:
        path = MODELS[name](cache)
        if args.pairs:
            print(f"{name}: {args.pairs} variants against themselves with one channel fewer")
            setup = SweepSetup(str(path), 0, (BUILTIN["CPU"], d, flat), config)
            off_by_one[name] = alignment_pairs(setup, args.pairs)
        for round_to in [None, *args.round_to]:
            run = name + (f" (widths x{round_to})" if round_to else " (random widths)")
            tag = name + (f"_x{round_to}" if round_to else "")
            devices = (BUILTIN["CPU"], d, flat)
            setup = SweepSetup(str(path), 0, devices, config, round_to=round_to)
            measured = []
            for k in range(args.measurements):
                csv_path = cache / (f"sweep_{tag}.csv" if k == 0 else f"sweep_{tag}_{k + 1}.csv")
                label = run + (f", measurement {k + 1}" if k else "")
                if not args.resume:
                    csv_path.unlink(missing_ok=True)
                rows = run_sweep(
                    setup,
                    args.variants,
                    csv_path,
                    on_variant=progress(label),
                )
                print()
                measured.append(column(rows, "relative"))
            # the geometric mean of all measurements: 1/K the variance of their noise
            target = geometric_mean(measured)
            rho = {p: spearman(column(rows, p), target) for p in setup.predictors()}
            halves = measured[0::2], measured[1::2]
            rho["measured again"] = (
                spearman(*map(geometric_mean, halves)) if len(measured) > 1 else None
            )
            results[run] = rho
            if args.plot_dir:
                xs = {p: column(rows, p) for p in setup.predictors()}
                threads = f"{args.threads} thread(s)" if args.threads else "default threads"
                times = f" (mean of {len(measured)} measurements)" if len(measured) > 1 else ""
                title = f"{run}, 224x224: {len(rows)} variants{times}, onnxruntime CPU, {threads}"
                out = str(args.plot_dir / f"sweep_{tag}.png")
                plot_sweep(xs, target, rho, title, out)

    predictors = [
        "measured again",
        "flops",
        "params",
        "latency_CPU_s",
        "latency_one-peak_s",
        "latency_this-machine_s",
    ]
    print(f"\nSpearman rank correlation with measured latency ({args.variants} variants)")
    print("| sweep | " + " | ".join(predictors) + " | goal: calibrated > FLOPs |")
    print("|---" * (len(predictors) + 2) + "|")
    ok = True
    for name, rho in results.items():
        cells = ["n/a" if rho[p] is None else f"{rho[p]:.3f}" for p in predictors]
        met = (rho["latency_this-machine_s"] or -2) > (rho["flops"] or -2)
        ok &= met
        print(f"| {name} | " + " | ".join(cells) + f" | {'met' if met else 'MISSED'} |")
    if off_by_one:
        columns = ["flops", "latency_CPU_s", "latency_this-machine_s", "measured"]
        print("\nOne channel fewer in every group of a variant with widths multiples of 8:")
        print("time ratio (fewer / aligned), mean and range over the variants")
        print("| model | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, pairs in off_by_one.items():
            cells = []
            for c in columns:
                ratios = [p[c] for p in pairs]
                cells.append(f"{np.mean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        report = {"device": profile_toml(d), "spearman": results, "one_fewer": off_by_one}
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
