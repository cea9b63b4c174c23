"""Benchmark tests import the ``bench`` package (``bench/`` at the repository root, not
installed with vlkit): put the root on ``sys.path``, whatever the cwd and pytest's import mode."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
