"""Figures (matplotlib, the optional ``plot`` extra): sweep scatter plots, MorphNet's
channels-per-layer bars, the per-layer roofline chart. Each is written atomically as a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from morphonnx.analysis import Analysis
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError
from morphonnx.formats import atomic_write


def pyplot(path: str) -> Any:
    """matplotlib's pyplot on the file-only backend, or a one-line error naming the output."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MorphonnxError(
            f"{path}: plotting needs matplotlib (pip install morphonnx[plot])"
        ) from None
    return plt


def save(fig: Any, path: str) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically and close it."""
    plt = pyplot(path)
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)


def _label(column: str) -> str:
    if column.startswith("latency_") and column.endswith("_s"):
        return f"roofline {column[len('latency_') : -2]} (s)"
    return column


def plot_sweep(
    predictors: Mapping[str, Sequence[float]],
    measured: Sequence[float],
    rho: Mapping[str, float | None],
    title: str,
    path: str,
) -> None:
    """One scatter panel per predictor: predicted cost against measured latency relative to the
    original model, with Spearman."""
    plt = pyplot(path)
    n = len(predictors)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, xs) in zip(axes.flat, predictors.items(), strict=False):
        ax.scatter(xs, measured, s=10)
        r = rho.get(name)
        ax.set_title(f"{_label(name)}: Spearman {'n/a' if r is None else f'{r:.3f}'}", fontsize=9)
        ax.set_xlabel(_label(name))
        ax.set_ylabel("measured / original")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, path)


def plot_widths(layers: Sequence[Mapping[str, Any]], title: str, path: str) -> None:
    """MorphNet's figure: output channels of every weighted layer, before and after."""
    plt = pyplot(path)
    shown = [la for la in layers if la.get("out_channels")]
    before = [la["out_channels"][0] for la in shown]
    after = [la["out_channels"][1] for la in shown]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(shown) + 2), 4))
    x = range(len(shown))
    ax.bar(x, before, color="#c8c8c8", label="before")
    ax.bar(x, after, color="#1f77b4", label="after")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("output channels")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    save(fig, path)


def plot_roofline(a: Analysis, device: Device, path: str) -> None:
    """Predicted time of every costed node in graph order, coloured by which roof bounds it."""
    plt = pyplot(path)
    seconds = [(c, c.latency(device)) for c in a.costs]
    known = [(c, t) for c, t in seconds if t is not None and t > 0]  # unknown ones are not drawn
    costs = [c for c, _ in known]
    times = [t * 1e6 for _, t in known]
    colors = ["#d62728" if c.bound(device) == "compute" else "#1f77b4" for c in costs]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.08 * len(costs) + 2), 4))
    ax.bar(range(len(costs)), times, color=colors, width=1.0)
    ax.set_xlabel("node (graph order)")
    ax.set_ylabel(f"predicted time on {device.name} (µs)")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="#d62728"),
        plt.Rectangle((0, 0), 1, 1, color="#1f77b4"),
    ]
    ax.legend(handles, ["compute-bound", "memory-bound"])
    total = sum(times)
    ax.set_title(f"{Path(a.graph.path).name}: {total:.4g} µs on {device.name}", fontsize=10)
    fig.tight_layout()
    save(fig, path)
