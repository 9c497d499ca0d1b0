"""``python -m morphonnx``."""

from morphonnx.cli import main

raise SystemExit(main())
