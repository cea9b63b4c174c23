"""Writing result tables and figures: atomic, deterministic, under ``results/``.

A table is written as CSV and Markdown side by side (``name.csv``, ``name.md``); numbers are
what the code measured on that run. Files are written to a temporary sibling and renamed,
so a killed run never leaves a half-written table. Measured timings and memory go to their
own files (``results/timings/``) so score tables stay byte-identical across runs.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .paths import RESULTS_DIR, RUNS_DIR


def results_dir(profile: str) -> Path:
    """Where a run of ``profile`` writes its tables: ``results/`` for the real profiles,
    ``runs/results-ci/`` (git-ignored) for ``ci``, so that CI and nbval never touch the
    committed results."""
    return RUNS_DIR / "results-ci" if profile == "ci" else RESULTS_DIR


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_table(df: pd.DataFrame, name: str, results_dir: str | Path | None = None,
                floatfmt: str = ".4g", note: str | None = None) -> tuple[Path, Path]:
    """Write ``df`` as ``<results>/<name>.csv`` and ``.md`` (with an optional note below).

    Missing values (a part with no parameters of its own, a device not measured) are empty
    in the CSV and "–" in the Markdown, never "nan"."""
    base = Path(results_dir or RESULTS_DIR) / name
    csv = atomic_write_text(base.with_suffix(".csv"), df.to_csv(index=False, lineterminator="\n"))
    shown = df.convert_dtypes().astype(object)
    shown = shown.where(shown.notna(), None)  # tabulate marks None, not NaN, as missing
    md_text = shown.to_markdown(index=False, floatfmt=floatfmt, missingval="–") + "\n"
    if note:
        md_text += f"\n{note.strip()}\n"
    md = atomic_write_text(base.with_suffix(".md"), md_text)
    return csv, md


def write_json(obj, name: str, results_dir: str | Path | None = None) -> Path:
    """Write ``obj`` as sorted, indented JSON to ``<results>/<name>.json``."""
    path = Path(results_dir or RESULTS_DIR) / f"{name}.json"
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def stage_timer(stage: str, profile: str, results_dir: str | Path | None = None):
    """Record a stage's wall time in ``results/timings/<stage>.<profile>.json``."""
    t0 = time.perf_counter()
    yield
    write_json({"stage": stage, "profile": profile, "wall_s": round(time.perf_counter() - t0, 1)},
               f"timings/{stage}.{profile}", results_dir)


def save_figure(fig, folder: str | Path, name: str, dpi: int = 80) -> Path:
    """Save a matplotlib figure as ``<folder>/<name>.png`` atomically (temporary sibling +
    ``os.replace``), without the software/date metadata that would make equal figures differ,
    and close it (notebooks draw many)."""
    import matplotlib.pyplot as plt

    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def show_table(df: pd.DataFrame, columns=None) -> None:
    """Print ``df`` without its index, restricted to the ``columns`` it has (all when ``None``)."""
    print((df if columns is None else df[[c for c in columns if c in df]]).to_string(index=False))
