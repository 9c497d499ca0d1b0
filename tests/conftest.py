"""Shared test setup: the helper modules in this folder (builders, tiny torch models, the
independent counter) import by their plain names from any test module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
