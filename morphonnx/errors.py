"""The one exception type users see, and how any text from a file or a user is shown."""

import unicodedata


class MorphonnxError(Exception):
    """A user-facing error; the CLI prints ``str(err)`` on one line and exits non-zero."""


def literal(text: str) -> str:
    """``text`` as it may reach a terminal: control characters (ANSI escapes, line breaks, bidi
    overrides) written as Python escapes, so a name or path from a file can neither split a
    one-line error nor restyle the terminal."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
        else c
        for c in text
    )
