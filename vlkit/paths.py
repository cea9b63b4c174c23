"""Where vlkit reads and writes, resolved from the repository root.

Notebooks run from their own folder under nbval and from the caller's folder under
papermill, so every path is resolved from the repository root, never from the cwd.
``VLKIT_ROOT`` overrides the root (e.g. to run against another checkout's data).
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The repository root: ``$VLKIT_ROOT`` or the folder holding this package."""
    env = os.environ.get("VLKIT_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent


ROOT = repo_root()
DATA_DIR = ROOT / "data"  # materialised datasets (DVC-tracked outputs, git-ignored)
CACHE_DIR = ROOT / "cache"  # downloaded source archives, feature caches (git-ignored)
RESULTS_DIR = ROOT / "results"  # tables, figures, metrics (committed)
RUNS_DIR = ROOT / "runs"  # checkpoints of training runs (git-ignored)
PARAMS_FILE = ROOT / "params.yaml"
