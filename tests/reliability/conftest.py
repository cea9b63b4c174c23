"""Reliability tests (kill-and-resume, corrupt checkpoints, NaN guards, determinism,
multi-process) and the small scripts they launch. Their shared helpers (tiny_task.py,
killing.py) are imported by plain name, whatever pytest's import mode."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
