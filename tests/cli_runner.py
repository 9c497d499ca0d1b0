"""The CLI run in-process, as every CLI test calls it."""

from __future__ import annotations

from typing import Any

from morphonnx.cli import main


def run(capsys: Any, *argv: object) -> tuple[int, str, str]:
    """``morphonnx argv`` in-process: (exit status, stdout, stderr); argparse's usage errors
    (SystemExit) count as an exit status too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err
