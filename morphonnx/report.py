"""What the commands print: terminal tables (rich) and the threshold plot (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from morphonnx.analysis import Analysis, unsupported_ops
from morphonnx.costs import OpCost, Totals
from morphonnx.devices import Device
from morphonnx.errors import MorphonnxError
from morphonnx.verify import Verification

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
    t = Table(
        title=f"Channel groups: {len(groups)} ({len(prunable)} prunable, "
        f"{sum(g.channels for g in prunable):,} prunable channels)"
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
        f"[bold]{g.path}[/bold]  opset {g.opset}, {len(g.nodes):,} nodes, inputs: {inputs}"
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
    status = "[green]passed[/green]" if v.ok else "[red]FAILED[/red]"
    console.print(
        f"verification {status}: {v.tensors} tensors compared, max deviation {v.max_abs:.3g} "
        f"(relative {v.max_rel:.3g} at `{v.worst}`)"
    )
    for f in v.failures[:10]:
        console.print(f"  {f}")


def plot_values(values: Mapping[str, np.ndarray], threshold: float, path: str) -> None:
    """Sorted regularization values (log scale) and their histogram, threshold marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MorphonnxError(
            f"{path}: --plot needs matplotlib (pip install morphonnx[plot])"
        ) from None
    allv = np.sort(np.concatenate([v.reshape(-1) for v in values.values()]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
