"""Nothing in vlkit unpickles: no torch.load without weights_only=True, no pickle/dill/joblib
loads, no torch.distributed *_object collectives (they pickle) -- reliability issue item 6."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

VLKIT = Path(__file__).resolve().parents[2] / "vlkit"

FORBIDDEN = {
    r"\bpickle\.loads?\(": "pickle.load",
    r"\b(cPickle|dill|cloudpickle|joblib)\.loads?\(": "pickle-like load",
    r"\b(pd|pandas)\.read_pickle\(": "pandas.read_pickle",
    r"\bnp\.load\([^)]*allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"\b(all_gather_object|gather_object|broadcast_object_list|scatter_object_list)\(": "pickling collective",
}


def calls(source: str, name: str):
    """Yield the full text of every call ``name(...)`` in ``source`` (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\s*\(", source):
        depth, i = 0, m.end() - 1
        for j in range(i, len(source)):
            depth += {"(": 1, ")": -1}.get(source[j], 0)
            if depth == 0:
                yield source[m.start(): j + 1]
                break


def scan(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text(encoding="utf-8")
        for call in calls(src, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                problems.append(f"{path}: {call!r} without weights_only=True")
        for pattern, what in FORBIDDEN.items():
            for m in re.finditer(pattern, src):
                problems.append(f"{path}: {what}: {m.group(0)!r}")
    return problems


def test_vlkit_never_unpickles():
    assert VLKIT.is_dir()
    assert scan(VLKIT) == []


@pytest.mark.parametrize("src, bad", [
    ("x = torch.load(path)\n", True),
    ("x = torch.load(path, map_location='cpu')\n", True),
    ("x = torch.load(path, weights_only=False)\n", True),
    ("x = torch.load(\n    path,\n    weights_only=True,\n)\n", False),
    ("x = torch.load(f(a, b), weights_only=True)\n", False),
    ("import pickle\nx = pickle.load(f)\n", True),
    ("obj = gather_object([state])\n", True),
    ("x = np.load(p, allow_pickle=True)\n", True),
    ("x = np.load(p)\n", False),
])
def test_the_scanner_catches_what_it_should(tmp_path, src, bad):
    (tmp_path / "m.py").write_text(src)
    assert bool(scan(tmp_path)) == bad
