"""The ``morphonnx`` command: parse arguments, call the core, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from morphonnx.devices import DEFAULT_DEVICES
from morphonnx.errors import MorphonnxError


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
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    p.add_argument("--top", type=int, default=10, metavar="K", help="layers to list (default 10)")

    p = sub.add_parser("spec", help="write the group spec that training adapters consume")
    _model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="SPEC.json")

    p = sub.add_parser("mask", help="alive/dead channels from trained weights")
    _model_args(p)
    p.add_argument("--spec", required=True, metavar="SPEC.json")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--threshold", type=float, help="a channel lives when its value exceeds T")
    how.add_argument("--auto", action="store_true", help="threshold in the gap of the values")
    p.add_argument("-o", "--output", required=True, metavar="MASK.json")
    p.add_argument("--plot", metavar="HIST.png", help="plot sorted values and histogram")
    p.add_argument("--kind", choices=["gamma", "group_lasso"], default="gamma")
    p.add_argument("--l1-fraction", type=float, default=0.0, help="group-LASSO L1 mix (0..1)")

    p = sub.add_parser("prune", help="remove dead channels; verify against the masked original")
    _model_args(p)
    p.add_argument("--mask", required=True, metavar="MASK.json")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--structure", metavar="OUT.json", help="write alive channels per layer")

    p = sub.add_parser("devices", help="list built-in device profiles")
    p.add_argument("--json", action="store_true", help="print as JSON")
    return top


def _analysis(args: argparse.Namespace) -> Any:
    from morphonnx.api import analyze_file

    a = analyze_file(
        args.model,
        batch=args.batch,
        input_shapes=dict(args.input_shape),
        devices=args.device or DEFAULT_DEVICES,
    )
    _batch_note(args, a)
    return a


def _batch_note(args: argparse.Namespace, a: Any) -> None:
    if args.batch != 1 and not a.graph.batch_used:
        print(
            f"morphonnx: note: --batch {args.batch} changes nothing: {args.model} has no dynamic "
            "batch dim (use --input-shape to set input shapes)",
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
    """Before any work: every output goes to an existing folder, is not a folder itself, and
    overwrites neither an input of the command (model, spec, mask, device profile) nor another
    output, so a failed or mistyped command never destroys a file the user still needs."""
    inputs = [("input model", args.model)]
    inputs += [("spec", getattr(args, "spec", None)), ("mask", getattr(args, "mask", None))]
    inputs += [("device profile", d) for d in getattr(args, "device", None) or []]
    given = [o for o in outs if o]
    for i, out in enumerate(given):
        target = Path(out)
        for what, name in inputs:
            if name and _same_file(target, Path(name)):
                raise MorphonnxError(f"{out}: refusing to overwrite the {what}")
        for other in given[:i]:
            if _same_file(target, Path(other)):
                raise MorphonnxError(f"{out}: the same file is given for two outputs")
        if target.is_dir():
            raise MorphonnxError(f"{out}: is a folder, expected a file name")
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise MorphonnxError(f"{out}: folder {parent} does not exist")


def cmd_analyze(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.analysis import report_json
    from morphonnx.formats import write_json
    from morphonnx.report import print_analysis

    if args.top < 0:
        raise MorphonnxError(f"--top must be 0 or more, got {args.top}")
    _check_outputs(args, args.json)
    a = _analysis(args)
    print_analysis(console, a, args.top)
    if args.json:
        write_json(args.json, report_json(a))
        console.print(f"wrote {args.json}")


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
    from morphonnx.formats import write_json
    from morphonnx.report import plot_values, print_mask

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise MorphonnxError(f"--threshold must be a finite number, got {args.threshold}")
    if not 0.0 <= args.l1_fraction <= 1.0:
        raise MorphonnxError(f"--l1-fraction must be between 0 and 1, got {args.l1_fraction}")
    _check_outputs(args, args.output, args.plot)
    a = _analysis(args)
    result = make_mask(
        a, args.spec, threshold=args.threshold, kind=args.kind, l1_fraction=args.l1_fraction
    )
    if result.note:
        console.print(result.note)
    if result.rescued:
        console.print(
            f"[yellow]threshold {result.threshold:.3g} kills every channel of "
            f"{', '.join(result.rescued)}: kept the strongest channel of each[/yellow]"
        )
    _, predicted = a.predict(result.keep)
    print_mask(console, a, result.keep, predicted, result.rescued)
    if args.plot:
        plot_values(result.values, result.threshold, args.plot)
        console.print(f"wrote {args.plot}")
    write_json(args.output, result.document(a.fingerprint, args.kind))
    console.print(f"wrote {args.output}")


def cmd_prune(args: argparse.Namespace, console: Any) -> None:
    from morphonnx.api import VerificationFailed, prune_file
    from morphonnx.report import print_verification, totals_table

    _check_outputs(args, args.output, args.structure)
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
        )
    except VerificationFailed as failed:
        print_verification(console, failed.verification)
        raise
    a = report.analysis
    _batch_note(args, a)
    if report.verification is not None:
        print_verification(console, report.verification)
    rows = [("before", a.totals), ("after", report.measured)]
    console.print(totals_table("Before and after", rows, a.devices))
    if not report.as_predicted:
        console.print("[yellow]note: costs differ from the mask's prediction[/yellow]")
    if args.structure:
        console.print(f"wrote {args.structure}")
    console.print(f"wrote {args.output}")


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
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False)
    try:
        COMMANDS[args.command](args, console)
    except MorphonnxError as exc:
        print(f"morphonnx: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("morphonnx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line unless debugging
        if os.environ.get("MORPHONNX_DEBUG"):
            raise
        msg = " ".join(str(exc).split())[:300]
        print(
            f"morphonnx: internal error: {type(exc).__name__}: {msg} "
            "(set MORPHONNX_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 2
    return 0
