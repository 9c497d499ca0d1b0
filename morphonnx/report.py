"""What the commands print: terminal tables (rich) and the threshold plot (matplotlib)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from morphonnx.analysis import Analysis, unsupported_ops
from morphonnx.calibrate import Calibration
from morphonnx.costs import OpCost, Totals
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError, literal
from morphonnx.profiling import Profile
from morphonnx.verify import Verification

if TYPE_CHECKING:
    from morphonnx.foldconst import FoldPlan


class LiteralConsole(Console):
    """A console that prints every string as it is: no rich markup, no emoji codes, control
    characters escaped. Names and paths come from files and users (``block[conv].weight``, a node
    called ``[/bold]``, ANSI escapes); colour is given with ``style=`` or :class:`Text` instead."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)  # type: ignore[arg-type]

    def render_str(self, text: str, **kwargs: object) -> Text:  # type: ignore[override]
        kwargs.update(markup=False, emoji=False)
        return super().render_str(literal(text), **kwargs)  # type: ignore[arg-type]


UNKNOWN = "?"
"""How a cost that cannot be computed (a shape is unknown) is printed: never as 0."""


def si(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (SI prefixes, three significant digits); None -> '?'."""
    if n is None:
        return UNKNOWN
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip() if isinstance(n, float) else f"{n} {unit}".rstrip()


def seconds(s: float | None) -> str:
    if s is None:
        return UNKNOWN
    for factor, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if s >= factor:
            return f"{s / factor:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def totals_table(
    title: str, rows: Sequence[tuple[str, Totals]], devices: Sequence[Device]
) -> Table:
    t = Table(title=title)
    t.add_column("")
    for name, _ in rows:
        t.add_column(name, justify="right")
    t.add_row("MACs", *[UNKNOWN if x.macs is None else f"{x.macs:,}" for _, x in rows])
    t.add_row("FLOPs", *[si(x.flops) for _, x in rows])
    t.add_row("params", *[f"{x.params:,}" for _, x in rows])
    t.add_row("weight bytes", *[si(x.weight_bytes, "B") for _, x in rows])
    for d in devices:
        t.add_row(f"latency {d.name}", *[seconds(x.latency.get(d.name)) for _, x in rows])
    if any(not x.complete for _, x in rows):
        t.caption = f"{UNKNOWN}: unknown; totals incomplete"
    return t


def top_table(costs: Sequence[OpCost], devices: Sequence[Device], k: int) -> Table:
    def key(c: OpCost) -> float:
        value = c.latency(devices[0]) if devices else c.flops
        return -1.0 if value is None else value  # unknown costs last

    t = Table(title=f"Top {k} layers by {'latency on ' + devices[0].name if devices else 'FLOPs'}")
    for col in ("node", "op", "FLOPs", "params", "bytes"):
        t.add_column(col, justify="left" if col in ("node", "op") else "right")
    for d in devices:
        t.add_column(d.name, justify="right")
    for c in sorted(costs, key=key, reverse=True)[:k]:
        t.add_row(
            c.name,
            c.op_type,
            si(c.flops),
            f"{c.params:,}",
            si(c.bytes, "B"),
            *[f"{seconds(c.latency(d))} ({c.bound(d) or UNKNOWN})" for d in devices],
        )
    return t


def groups_table(a: Analysis) -> Table:
    groups = a.solution.groups
    prunable = [g for g in groups if g.prunable]
    heads = "; whole attention heads" if a.attention == "heads" else ""
    t = Table(
        title=f"Channel groups: {len(groups)} ({len(prunable)} prunable, "
        f"{sum(g.channels for g in prunable):,} prunable channels{heads})"
    )
    for col in ("id", "channels", "producers", "prunable / reason"):
        t.add_column(col, justify="right" if col == "channels" else "left")
    for g in groups:
        producers = [m.tensor for m in g.members if m.role == "producer"]
        shown = ", ".join(producers[:3]) + (f" +{len(producers) - 3}" if len(producers) > 3 else "")
        t.add_row(g.id, str(g.channels), shown or "-", "yes" if g.prunable else f"no: {g.reason}")
    return t


def print_analysis(console: Console, a: Analysis, top: int) -> None:
    g = a.graph
    inputs = ", ".join(f"{n} {list(g.shape(n) or ())}" for n in g.inputs)
    console.print(
        Text.assemble((literal(str(g.path)), "bold"), f"  opset {g.opset}, {len(g.nodes):,} nodes")
        + Text(literal(f", inputs: {inputs}"))
    )
    console.print(totals_table("Totals", [("model", a.totals)], a.devices))
    console.print(top_table(a.costs, a.devices, top))
    console.print(groups_table(a))
    unknown = unsupported_ops(a)
    if unknown:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(unknown.items()))
        console.print(f"ops without a channel rule (they stop the groups they touch): {listed}")


def print_devices(console: Console, devices: Sequence[Device]) -> None:
    t = Table(title="Device profiles (roofline: max(FLOPs / peak, bytes / bandwidth))")
    for col in ("name", "peak FLOP/s", "bandwidth", "bytes/elem", "note"):
        t.add_column(col)
    for d in devices:
        t.add_row(
            d.name,
            si(d.peak_flops, "FLOP/s"),
            si(d.mem_bandwidth, "B/s"),
            str(d.bytes_per_element or "dtype"),
            d.note,
        )
    console.print(t)


def print_mask(
    console: Console,
    a: Analysis,
    keep: Mapping[str, Sequence[bool]],
    predicted: Totals,
    rescued: Sequence[str],
) -> None:
    t = Table(title="Channels kept per group")
    for col in ("group", "kept", "of", "producers"):
        t.add_column(col, justify="right" if col in ("kept", "of") else "left")
    total_kept = total = 0
    for g in a.solution.groups:
        if not g.prunable:
            continue
        kept = int(np.sum(keep[g.id])) if g.id in keep else g.channels
        total_kept, total = total_kept + kept, total + g.channels
        producers = ", ".join(m.tensor for m in g.members if m.role == "producer")
        mark = " (strongest kept)" if g.id in rescued else ""
        t.add_row(g.id, f"{kept}{mark}", str(g.channels), producers[:60])
    t.add_row("total", str(total_kept), str(total), "")
    console.print(t)
    console.print(
        totals_table(
            "Costs before and after", [("before", a.totals), ("after", predicted)], a.devices
        )
    )


def print_verification(console: Console, v: Verification) -> None:
    status = ("passed", "green") if v.ok else ("FAILED", "red")
    console.print(
        Text.assemble("verification ", status)
        + Text(
            literal(
                f": {v.tensors} tensors compared, max deviation {v.max_abs:.3g} "
                f"(relative {v.max_rel:.3g} at `{v.worst}`)"
            )
        )
    )
    for f in v.failures[:10]:
        console.print(f"  {f}")


def print_deviation(
    console: Console, plan: FoldPlan | None, runs: list[tuple[str, dict[str, float]]]
) -> None:
    """What the folded constants and the channels below threshold (but not zero) change: the
    pruned model against the original, per graph output, on each set of inputs."""
    if plan is not None:
        per_position = sum(plan.static and not c.uniform for c in plan.corrections)
        console.print(
            f"folded dead channels' constants into {len(plan.corrections)} layer(s)"
            + (f", {per_position} as per-position constants (zero padding)" if per_position else "")
        )
        for c in plan.inexact:
            console.print(
                f"  `{c.node}`: dynamic spatial shape, folded the interior value; up to "
                f"{c.border:.3g} off near borders",
                style="yellow",
            )
    for what, deviation in runs:
        shown = ", ".join(f"`{k}` {v:.3g}" for k, v in deviation.items())
        console.print(f"pruned vs original on {what}: max deviation {shown}")


def plot_values(values: Mapping[str, np.ndarray], threshold: float, path: str) -> bytes:
    """Sorted regularization values (log scale) and their histogram, threshold marked: the image
    file's bytes, in the format ``path``'s suffix names (written by the caller, after the mask)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MorphonnxError(
            f"{path}: --plot needs matplotlib (pip install morphonnx[plot])"
        ) from None
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    allv = np.sort(np.concatenate([v.reshape(-1) for v in values.values()]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise MorphonnxError(f"{path}: cannot plot to .{fmt} files (use .png, .pdf or .svg)")
        left.semilogy(np.maximum(allv, 1e-12), ".", markersize=2)
        left.axhline(max(threshold, 1e-12), color="red", label=f"threshold {threshold:.3g}")
        left.set_xlabel("channel (sorted)")
        left.set_ylabel("regularization value")
        left.legend()
        logs = np.log10(np.maximum(allv, 1e-12))
        right.hist(logs, bins=60)
        right.axvline(np.log10(max(threshold, 1e-12)), color="red")
        right.set_xlabel("log10(value)")
        right.set_ylabel("channels")
        fig.suptitle(f"{len(allv)} channels, {int((allv > threshold).sum())} alive")
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, format=fmt, dpi=100)
        return image.getvalue()
    finally:
        plt.close(fig)


def print_calibration(console: Console, c: Calibration) -> None:
    t = Table(title=f"Calibration of {c.device.name} ({c.device.note})")
    for col in ("measured", "FLOPs", "bytes", "own time", "rate"):
        t.add_column(col, justify="left" if col == "measured" else "right")
    for m in c.measurements:
        rate = si(m.rate, "FLOP/s" if m.flops else "B/s") if m.flops or m.nbytes else "overhead"
        t.add_row(m.what, si(m.flops), si(m.nbytes, "B"), seconds(m.seconds), rate)
    console.print(t)
    console.print(f"a run's own cost (one tiny op): {seconds(c.call_overhead)}")


def print_profile(console: Console, p: Profile, top: int) -> None:
    d = p.device.name
    nodes = sorted(p.nodes, key=lambda n: n.measured or 0.0, reverse=True)[:top]
    t = Table(title=f"Top {top} nodes by measured time (predicted on {d})")
    for col in ("node", "op", "measured", "predicted", "predicted / measured"):
        t.add_column(col, justify="left" if col in ("node", "op") else "right")
    for n in nodes:
        ratio = f"{n.predicted / n.measured:.2f}" if n.measured else "-"
        shown = seconds(n.measured) if n.measured is not None else "not run"
        t.add_row(n.name, n.op_type, shown, seconds(n.predicted), ratio)
    console.print(t)
    t = Table(title="Where the model misses (by op type, largest gap first)")
    for col in ("op type", "nodes", "measured", "predicted", "predicted / measured"):
        t.add_column(col, justify="left" if col == "op type" else "right")
    for m in p.by_op_type():
        ratio = f"{m.ratio:.2f}" if m.ratio is not None else "-"
        t.add_row(m.op_type, str(m.nodes), seconds(m.measured), seconds(m.predicted), ratio)
    console.print(t)
    unmeasured = sum(1 for n in p.nodes if n.measured is None)
    console.print(
        f"total: measured {seconds(p.measured_total)} in kernels ({seconds(p.run)} per run, "
        f"{p.config.repeats} runs, graph optimizations off), predicted {seconds(p.predicted_total)}"
        f" on {d}; {len(p.nodes) - unmeasured} of {len(p.nodes)} nodes ran a kernel"
    )


def print_correlations(console: Console, rho: Mapping[str, float | None], n: int) -> None:
    t = Table(title=f"Spearman rank correlation with measured latency ({n} variants)")
    t.add_column("predictor")
    t.add_column("Spearman", justify="right")
    for name, r in rho.items():
        t.add_row(name, "n/a" if r is None else f"{r:.3f}")
    console.print(t)
