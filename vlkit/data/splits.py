"""Seeded randomness and splits shared by the dataset builders.

Every random stream is a numpy ``PCG64`` generator seeded from a :class:`numpy.random.SeedSequence`
of ``(seed, crc32(dataset name), split index)``: deterministic across processes and Python
hash seeds, and the streams of different splits (and datasets) are independent, so the
generated splits use disjoint seeds.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def rng_for(seed: int, name: str, *stream: int) -> np.random.Generator:
    """The random generator of dataset ``name`` under ``seed`` (``stream`` picks a sub-stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), *map(int, stream)]))


def split_rng(seed: int, name: str, split: str) -> np.random.Generator:
    return rng_for(seed, name, 1 + SPLITS.index(split))


def stratified_split(labels: Sequence[int], val_frac: float, test_frac: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices of train / val / test, stratified by label.

    Per class (in sorted label order) the rows are permuted with ``rng``; the first
    ``round(test_frac * n_c)`` go to test, the next ``round(val_frac * n_c)`` to val, the
    rest to train. Each split is then shuffled with ``rng`` (the source files are grouped
    by class, and a profile that takes the first rows must not see a single class).
    """
    labels = np.asarray(labels)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(test_frac * len(idx)), round(val_frac * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}


def check_fraction(name: str, value) -> float:
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 1)")
    return v
