"""Shared test setup: the helper modules in this folder (builders, tiny torch models, the
independent counter) import by their plain names from any test module; hypothesis runs the same
examples on every run (a property test must not fail a landing by chance), unless
``HYPOTHESIS_PROFILE=explore`` asks for new random ones."""

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
