"""Benchmark result files: one JSON (+ Markdown table) per benchmark and device.

Layout (DESIGN.md, "Efficiency accounting")::

    results/bench/<bench>.<device>.json     the payload, as given
    results/bench/<bench>.<device>.md       a Markdown rendering of payload["rows"], if any

``device`` is a :func:`vlkit.efficiency.device_tag` (``cpu-2t``, ``h100``, ...). A run on one
device writes only that device's files, atomically (temporary file in the same folder, then
``os.replace``), so a CPU run never clobbers GPU numbers and a crash leaves no half-written
file. Tables read cells with :func:`bench_cell`, which says ``"not measured"`` for a device
that has no file yet.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .models.protocol import UnknownNameError
from .paths import RESULTS_DIR

NOT_MEASURED = "not measured"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

__all__ = ["NOT_MEASURED", "bench_dir", "bench_path", "write_bench", "read_bench", "bench_cell", "bench_devices",
           "rows_to_markdown"]


def bench_dir(results_dir: str | os.PathLike | None = None) -> Path:
    """``results_dir`` (default ``<repo>/results/bench``)."""
    return Path(results_dir) if results_dir is not None else RESULTS_DIR / "bench"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"bad {kind} name {name!r}: use letters, digits, '_' and '-' only "
                         f"(no dots: the file is <bench>.<device>.json)")
    return name


def bench_path(bench: str, device: str, results_dir: str | os.PathLike | None = None, suffix: str = ".json") -> Path:
    """Path of ``<bench>.<device><suffix>`` under :func:`bench_dir`."""
    return bench_dir(results_dir) / f"{_check_name('bench', bench)}.{_check_name('device', device)}{suffix}"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6)) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "\\|").replace("\n", " ")


def rows_to_markdown(rows: Sequence[dict], title: str | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (columns: keys in order of first appearance)."""
    cols: list[str] = []
    for r in rows:
        if not isinstance(r, dict):
            raise TypeError(f"rows must be dicts, got {type(r).__name__}")
        cols += [k for k in r if k not in cols]
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bench(bench: str, device: str, payload: dict, results_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` to ``<bench>.<device>.json`` (and ``payload["rows"]`` to ``.md``).

    Only this device's two files are written (or, when ``payload`` has no rows, a stale
    ``.md`` of this device removed); other devices' files are never opened. The JSON must be
    strict (no NaN / inf: they are not JSON), so bad numbers fail here, not in the reader.
    Returns the JSON path.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = bench_path(bench, device, results_dir)
    try:
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise ValueError(f"payload for {path.name} holds a non-finite number ({e}); record it as null "
                         f"or '{NOT_MEASURED}'") from e
    md_path = path.with_suffix(".md")
    rows = payload.get("rows")
    if rows is not None:
        _atomic_write(md_path, rows_to_markdown(rows, title=f"{bench} -- {device}"))
    elif md_path.exists():
        md_path.unlink()
    _atomic_write(path, text)
    return path


def read_bench(bench: str, device: str, results_dir: str | os.PathLike | None = None) -> dict | None:
    """The payload written for ``(bench, device)``, or ``None`` if that device has no file."""
    path = bench_path(bench, device, results_dir)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt benchmark file {path}: {e}") from e


def bench_devices(bench: str, results_dir: str | os.PathLike | None = None) -> list[str]:
    """Device tags that have a result file for ``bench``, sorted."""
    d = bench_dir(results_dir)
    prefix = f"{_check_name('bench', bench)}."
    return sorted(p.name[len(prefix):-len(".json")] for p in d.glob(f"{prefix}*.json")) if d.exists() else []


def bench_cell(bench: str, device: str, key: str | Sequence[str | int],
               results_dir: str | os.PathLike | None = None) -> Any:
    """``payload[key]`` of ``(bench, device)`` -- or ``"not measured"`` if that device has no file.

    ``key`` may be a path into nested dicts / lists (``("rows", 0, "median_s")``). A key the
    file lacks is an error naming the valid keys (a typo must not read as "not measured").
    """
    payload = read_bench(bench, device, results_dir)
    if payload is None:
        return NOT_MEASURED
    keys = [key] if isinstance(key, (str, int)) else list(key)
    v: Any = payload
    for k in keys:
        if isinstance(v, dict):
            if k not in v:
                raise UnknownNameError("key", k, list(v))
            v = v[k]
        elif isinstance(v, list) and isinstance(k, int):
            if not -len(v) <= k < len(v):
                raise IndexError(f"index {k} out of range for a list of {len(v)} in {bench}.{device}")
            v = v[k]
        else:
            raise TypeError(f"cannot index {type(v).__name__} with {k!r} in {bench}.{device}")
    return v
