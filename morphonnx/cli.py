"""The ``morphonnx`` command: parse arguments, call the core, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from morphonnx.devices import DEFAULT_DEVICES
from morphonnx.errors import MorphonnxError, literal


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... (integers), got '{text}'")
    return name, shape


def _model_args(p: argparse.ArgumentParser, devices: bool = True) -> None:
    p.add_argument("model", help="the ONNX file")
    p.add_argument("--batch", type=int, default=1, help="value of a dynamic batch dim (default 1)")
    p.add_argument(
        "--input-shape",
        type=_input_shape,
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="shape of an input with dynamic dims (repeatable)",
    )
    if devices:
        p.add_argument(
            "--device",
            action="append",
            default=[],
            metavar="NAME|FILE",
            help="built-in device profile (see `morphonnx devices`) or a .json/.toml profile; "
            f"repeatable (default {', '.join(DEFAULT_DEVICES)})",
        )


def _attention_arg(p: argparse.ArgumentParser, recorded_in: str = "") -> None:
    from morphonnx.formats import ATTENTION

    default = f"the one the {recorded_in} records" if recorded_in else "dims"
    p.add_argument(
        "--attention",
        choices=ATTENTION,
        help="how attention heads are grouped: dims (per head dim, the same dims in every head) "
        f"or heads (whole heads: a head's q, k, v dims and projection rows); default {default}",
    )


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="onnxruntime intra-op threads, as you run inference (default: the device profile's, "
        "else onnxruntime's default)",
    )


def _measure_args(p: argparse.ArgumentParser, repeats: int) -> None:
    _threads_arg(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed runs, median (default {repeats})"
    )


class _Parser(argparse.ArgumentParser):
    """argparse with the contract's one-line errors (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        flat = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {flat} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="morphonnx",
        description="MorphNet-style structure learning for ONNX models: costs and channel groups "
        "(analyze), the group spec for training adapters (spec), alive/dead channels from trained "
        "weights (mask), and the smaller verified model (prune).",
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="per-layer costs, roofline latency and channel groups")
    _model_args(p)
    _attention_arg(p)
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--top", type=int, default=10, metavar="K", help="layers to list (default 10)")
    p.add_argument(
        "--plot", metavar="ROOFLINE.png", help="per-layer time on the first device, by bound"
    )

    p = sub.add_parser("spec", help="write the group spec that training adapters consume")
    _model_args(p)
    _attention_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="SPEC.json")

    p = sub.add_parser("mask", help="alive/dead channels from trained weights")
    _model_args(p)
    _attention_arg(p, "spec")
    p.add_argument("--spec", required=True, metavar="SPEC.json")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="a channel lives when its value exceeds T")
    how.add_argument("--auto", action="store_true", help="threshold in the gap of the values")
    p.add_argument("-o", "--output", required=True, metavar="MASK.json")
    p.add_argument("--plot", metavar="HIST.png", help="plot sorted values and histogram")
    p.add_argument("--kind", choices=["gamma", "group_lasso"], default="gamma")
    p.add_argument("--l1-fraction", type=float, default=0.0, help="group-LASSO L1 mix (0..1)")
    p.add_argument(
        "--round-to",
        type=int,
        metavar="K",
        help="alive count of each group to the nearest multiple of K (strongest channels kept)",
    )

    p = sub.add_parser("prune", help="remove dead channels; verify against the masked original")
    _model_args(p)
    _attention_arg(p, "mask")
    p.add_argument("--mask", required=True, metavar="MASK.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--structure", metavar="OUT.json", help="write alive channels per layer")
    p.add_argument("--plot", metavar="WIDTHS.png", help="plot channels per layer before/after")
    p.add_argument(
        "--fold-constants",
        action="store_true",
        help="fold each dead channel's constant output (its BN shift or bias) into its consumers",
    )
    p.add_argument(
        "--calibration-data",
        metavar="INPUTS.npz",
        help="report the pruned model's deviation from the original on these inputs",
    )

    p = sub.add_parser("expand", help="widen the learned structure back to a cost budget")
    _model_args(p)
    _attention_arg(p, "mask")
    p.add_argument("--mask", required=True, metavar="MASK.json")
    p.add_argument("--target", required=True, choices=["flops", "size", "latency"])
    p.add_argument(
        "--budget",
        type=float,
        help="cost to reach: FLOPs, parameters or seconds (default: the model's own cost)",
    )
    p.add_argument("--round-to", type=int, metavar="K", help="widths to multiples of K")
    p.add_argument("-o", "--output", required=True, metavar="WIDTHS.json")
    p.add_argument("--onnx", metavar="EXPANDED.onnx", help="also write a model of that structure")

    p = sub.add_parser("calibrate", help="measure this machine; write a device profile")
    p.add_argument("-o", "--output", required=True, metavar="PROFILE.toml")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    _threads_arg(p)
    p.add_argument("--quick", action="store_true", help="small problem sizes (rough, seconds)")

    p = sub.add_parser("profile", help="measured time per node next to the predicted time")
    _model_args(p)
    _measure_args(p, repeats=20)
    p.add_argument("--top", type=int, default=15, metavar="K", help="nodes to list (default 15)")
    p.add_argument("--json", metavar="OUT", help="also write the per-node times as JSON")

    p = sub.add_parser("sweep", help="random-width variants measured: which cost ranks latency")
    _model_args(p)
    _measure_args(p, repeats=10)
    p.add_argument("-n", "--variants", type=int, required=True, metavar="N")
    p.add_argument("-o", "--output", required=True, metavar="SWEEP.csv", help="(resumed)")
    p.add_argument("--plot", metavar="SWEEP.png", help="scatter plots of predicted vs measured")
    p.add_argument("--seed", type=int, default=0, help="random masks' seed (default 0)")
    p.add_argument("--keep-models", metavar="DIR", help="keep the pruned variants in DIR")
    p.add_argument("--round-to", type=int, metavar="K", help="random widths as multiples of K")
    _attention_arg(p)

    p = sub.add_parser("devices", help="list built-in device profiles")
    p.add_argument("--json", action="store_true", help="print as JSON")
    return top


def _analysis(args: argparse.Namespace, attention: str | None = None) -> Any:
    """The model analysed with the command's options; ``attention``: the grouping a spec or mask
    file records (else ``--attention``, else per head dim)."""
    from morphonnx.api import analyze_file
    from morphonnx.formats import check_attention

    a = analyze_file(
        args.model,
        batch=args.batch,
        input_shapes=dict(args.input_shape),
        devices=args.device or DEFAULT_DEVICES,
        attention=check_attention(attention or getattr(args, "attention", None) or "dims"),
    )
    _notes(args, a)
    return a


def _notes(args: argparse.Namespace, a: Any) -> None:
    """What the user should know about this analysis: a --batch that changed nothing, and shapes
    that stay unknown (costs shown as unknown, totals incomplete)."""
    from morphonnx.analysis import unknown_note

    note = unknown_note(a)
    if note is not None:
        print(f"morphonnx: warning: {args.model}: {note}", file=sys.stderr)
    if args.batch != 1 and not a.graph.batch_used:
        print(
            f"morphonnx: note: --batch {args.batch} changes nothing: {literal(args.model)} has no "
            "dynamic batch dim (use --input-shape to set input shapes)",
            file=sys.stderr,
        )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_outputs(args: argparse.Namespace, *outs: str | None) -> None:
    """Before any work: every output goes to an existing folder, is free or a regular file
    (``formats.check_output``), and overwrites neither an input of the command (model, spec, mask,
    device profile) nor another output, so a failed or mistyped command never destroys a file the
    user still needs."""
    from morphonnx.formats import check_output

    inputs = [("input model", getattr(args, "model", None))]
    inputs += [("spec", getattr(args, "spec", None)), ("mask", getattr(args, "mask", None))]
    inputs += [("calibration data", getattr(args, "calibration_data", None))]
    inputs += [("device profile", d) for d in getattr(args, "device", None) or []]
    given = [o for o in outs if o is not None]
    for i, out in enumerate(given):
        target = check_output(out)
        for what, name in inputs:
            if name and _same_file(target, Path(name)):
                raise MorphonnxError(f"{out}: refusing to overwrite the {what}")
        for other in given[:i]:
            if _same_file(target, Path(other)):
                raise MorphonnxError(f"{out}: the same file is given for two outputs")


def cmd_analyze(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.analysis import report_json
    from morphonnx.formats import write_json
    from morphonnx.report import print_analysis

    if args.top < 0:
        raise MorphonnxError(f"--top must be 0 or more, got {args.top}")
    _check_outputs(args, args.json, args.plot)
    a = _analysis(args)
    print_analysis(console, a, args.top)
    if args.json:
        write_json(args.json, report_json(a))
        console.print(f"wrote {args.json}")
    if args.plot:
        from morphonnx.plots import plot_roofline

        plot_roofline(a, a.devices[0], args.plot)
        console.print(f"wrote {args.plot}")


def cmd_spec(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.api import make_spec
    from morphonnx.formats import write_json

    _check_outputs(args, args.output)
    spec = make_spec(_analysis(args))
    write_json(args.output, spec)
    prunable = [g for g in spec["groups"] if g["prunable"]]
    console.print(
        f"wrote {args.output}: {len(spec['groups'])} groups ({len(prunable)} prunable), "
        f"{len(spec['costs'])} cost terms"
    )


def cmd_mask(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.api import make_mask
    from morphonnx.formats import (
        SPEC_FORMAT,
        file_attention,
        same_attention,
        write_bytes,
        write_json,
    )
    from morphonnx.report import plot_values, print_mask

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise MorphonnxError(f"--threshold must be a finite number, got {args.threshold}")
    if not 0.0 <= args.l1_fraction <= 1.0:
        raise MorphonnxError(f"--l1-fraction must be between 0 and 1, got {args.l1_fraction}")
    _check_outputs(args, args.output, args.plot)
    recorded = file_attention(args.spec, SPEC_FORMAT)
    a = _analysis(args, same_attention(recorded, args.attention, args.spec))
    result = make_mask(
        a,
        args.spec,
        threshold=args.threshold,
        kind=args.kind,
        l1_fraction=args.l1_fraction,
        round_to=args.round_to,
    )
    if result.note:
        console.print(result.note)
    if result.rescued:
        console.print(
            f"threshold {result.threshold:.3g} kills every channel of "
            f"{', '.join(result.rescued)}: kept the strongest channel of each",
            style="yellow",
        )
    _, predicted = a.predict(result.keep)
    print_mask(console, a, result.keep, predicted, result.rescued)
    image = plot_values(result.values, result.threshold, args.plot) if args.plot else None
    write_json(args.output, result.document(a.fingerprint, args.kind, a.attention))
    console.print(f"wrote {args.output}")
    if image is not None:  # last: a mask that fails leaves no plot behind
        write_bytes(args.plot, image)
        console.print(f"wrote {args.plot}")


def cmd_prune(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.api import VerificationFailed, prune_file
    from morphonnx.report import print_deviation, print_verification, totals_table

    _check_outputs(args, args.output, args.structure, args.plot)
    if args.plot:
        from morphonnx.plots import pyplot

        pyplot(args.plot)  # a missing matplotlib stops the command before any work
    try:
        report = prune_file(
            args.model,
            args.mask,
            args.output,
            verify=not args.no_verify,
            structure=args.structure,
            batch=args.batch,
            input_shapes=dict(args.input_shape),
            devices=args.device or DEFAULT_DEVICES,
            fold_constants=args.fold_constants,
            calibration=args.calibration_data,
            attention=args.attention,
        )
    except VerificationFailed as failed:
        print_verification(console, failed.verification)
        raise
    a = report.analysis
    _notes(args, a)
    if report.verification is not None:
        print_verification(console, report.verification)
    if report.fold is not None or report.deviation:
        print_deviation(console, report.fold, report.deviation)
    rows = [("before", a.totals), ("after", report.measured)]
    console.print(totals_table("Before and after", rows, a.devices))
    if not report.as_predicted:
        console.print("note: costs differ from the mask's prediction", style="yellow")
    if args.structure:
        console.print(f"wrote {args.structure}")
    if args.plot:
        from morphonnx.plots import plot_widths

        title = f"{Path(args.model).name}: output channels per layer"
        plot_widths(report.structure["layers"], title, args.plot)
        console.print(f"wrote {args.plot}")
    console.print(f"wrote {args.output}")


def cmd_expand(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.expand import expand, expand_model
    from morphonnx.formats import MASK_FORMAT, file_attention, same_attention, write_json
    from morphonnx.mask import load_mask
    from morphonnx.prune import check_pruned, save_model
    from morphonnx.report import totals_table

    _check_outputs(args, args.output, args.onnx)
    recorded = file_attention(args.mask, MASK_FORMAT)
    a = _analysis(args, same_attention(recorded, args.attention, args.mask))
    keep = load_mask(a, args.mask)
    device = a.devices[0] if args.target == "latency" else None
    e = expand(a, keep, args.target, device, args.budget, args.round_to)
    alive = sum(e.alive.values())
    console.print(
        f"width multiplier {e.multiplier:.4g}: {alive:,} alive channels -> "
        f"{sum(e.widths.values()):,}; {args.target} {e.cost:.4g} of budget {e.budget:.4g}"
    )
    _, masked = a.predict(keep)
    rows = [("original", a.totals), ("mask", masked), ("expanded", e.totals)]
    console.print(totals_table("Costs", rows, a.devices))
    doc = e.document(a)
    if args.onnx:
        model = expand_model(a, keep, e.widths)
        save_model(model, args.onnx, a.graph.path, lambda p: check_pruned(p, args.onnx))
        console.print(f"wrote {args.onnx}")
    write_json(args.output, doc)
    console.print(f"wrote {args.output}")


def _run_config(args: argparse.Namespace, devices: Sequence[Any]) -> Any:
    """Threads from ``--threads``, else from the first device profile that was calibrated."""
    from morphonnx.runtime import RunConfig

    threads = args.threads
    if threads is None:
        threads = next((d.threads for d in devices if d.threads is not None), 0)
    for flag, value, least in (
        ("--threads", threads, 0),
        ("--warmup", args.warmup, 0),
        ("--repeats", args.repeats, 1),
    ):
        if value < least:
            raise MorphonnxError(f"{flag} must be {least} or more, got {value}")
    return RunConfig(threads=threads, warmup=args.warmup, repeats=args.repeats)


def cmd_calibrate(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.calibrate import calibrate
    from morphonnx.devices import profile_toml
    from morphonnx.formats import write_text
    from morphonnx.report import print_calibration

    out = Path(args.output)
    if out.suffix.lower() != ".toml":
        raise MorphonnxError(f"{args.output}: the profile is written as TOML; name it *.toml")
    if args.threads is not None and args.threads < 0:
        raise MorphonnxError(f"--threads must be 0 or more, got {args.threads}")
    _check_outputs(args, args.output)
    name = args.name or out.stem
    with console.status("measuring") as status:
        c = calibrate(
            name, args.threads or 0, args.quick, lambda w: status.update(f"measuring {w}")
        )
    print_calibration(console, c)
    text = profile_toml(c.device)
    write_text(out, text)
    console.print(f"wrote {args.output} (use it as --device {args.output})")


def cmd_profile(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.formats import write_json
    from morphonnx.profiling import profile
    from morphonnx.report import print_profile

    if len(args.device) > 1:
        raise MorphonnxError("profile compares with one device; give --device once")
    if args.top < 0:
        raise MorphonnxError(f"--top must be 0 or more, got {args.top}")
    args.device = args.device or ["CPU"]
    _check_outputs(args, args.json)
    a = _analysis(args)
    p = profile(a, a.devices[0], _run_config(args, a.devices))
    print_profile(console, p, args.top)
    if args.json:
        write_json(args.json, p.document())
        console.print(f"wrote {args.json}")


def cmd_sweep(args: argparse.Namespace, console: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from morphonnx.devices import BUILTIN, resolve_device
    from morphonnx.formats import check_attention
    from morphonnx.plots import plot_sweep, pyplot
    from morphonnx.report import print_correlations
    from morphonnx.sweep import SweepSetup, column, correlations, run_sweep, shapes_tuple

    if args.variants < 2:
        raise MorphonnxError(
            f"-n must be 2 or more (a rank correlation needs two), got {args.variants}"
        )
    if args.round_to is not None and args.round_to < 1:
        raise MorphonnxError(f"--round-to must be 1 or more, got {args.round_to}")
    models = Path(args.keep_models) if args.keep_models else None
    if models is not None and not models.is_dir():
        raise MorphonnxError(f"{args.keep_models}: folder does not exist")
    _check_outputs(args, args.output, args.plot)
    if args.plot:
        pyplot(args.plot)  # a missing matplotlib stops the command before any measuring
    devices = [BUILTIN["CPU"]]
    for d in map(resolve_device, args.device):
        if all(d.name != e.name for e in devices):
            devices.append(d)
    setup = SweepSetup(
        model=args.model,
        seed=args.seed,
        devices=tuple(devices),
        config=_run_config(args, devices),
        batch=args.batch,
        input_shapes=shapes_tuple(dict(args.input_shape)),
        round_to=args.round_to,
        attention=check_attention(args.attention or "dims"),
    )
    with Progress(
        "variants", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("sweep", total=args.variants)
        rows = run_sweep(
            setup,
            args.variants,
            Path(args.output),
            models,
            lambda done, total: bar.update(task, completed=done, total=total),
        )
    rho = correlations(setup, rows)
    print_correlations(console, rho, len(rows))
    console.print(f"wrote {args.output}")
    if args.plot:
        measured = column(rows, "relative")
        xs = {p: column(rows, p) for p in setup.predictors()}
        title = f"{Path(args.model).name}: {len(rows)} random-width variants"
        plot_sweep(xs, measured, rho, title, args.plot)
        console.print(f"wrote {args.plot}")


def cmd_devices(args: argparse.Namespace, console: Any) -> None:
    from dataclasses import asdict

    from morphonnx.devices import list_devices
    from morphonnx.report import print_devices

    if args.json:
        print(json.dumps([asdict(d) for d in list_devices()], indent=1))
    else:
        print_devices(console, list_devices())


COMMANDS = {
    "analyze": cmd_analyze,
    "spec": cmd_spec,
    "mask": cmd_mask,
    "prune": cmd_prune,
    "devices": cmd_devices,
    "expand": cmd_expand,
    "calibrate": cmd_calibrate,
    "profile": cmd_profile,
    "sweep": cmd_sweep,
}


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so every temporary file is removed on the
    way out (the handlers that remove them catch ``BaseException``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    raise Terminated(signum)


@contextmanager
def _unwind_on_termination() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Terminated` while a command runs (main thread only: Python
    delivers signals there), and the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {k: signal.signal(k, _terminate) for k in kinds}
    try:
        yield
    finally:
        for k, handler in previous.items():
            signal.signal(k, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from morphonnx.report import LiteralConsole

    console = LiteralConsole()
    try:
        with _unwind_on_termination():
            COMMANDS[args.command](args, console)
    except MorphonnxError as exc:
        print(f"morphonnx: error: {literal(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("morphonnx: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"morphonnx: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    except Exception as exc:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("MORPHONNX_DEBUG"):
            raise
        msg = literal(" ".join(str(exc).split())[:300])
        print(
            f"morphonnx: internal error: {type(exc).__name__}: {msg} "
            "(set MORPHONNX_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 2
    return 0
