"""The one exception type users see: a one-line message naming the file and the problem."""


class MorphonnxError(Exception):
    """A user-facing error; the CLI prints ``str(err)`` on one line and exits non-zero."""
