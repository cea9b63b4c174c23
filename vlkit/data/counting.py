"""shapes_count: a generated image-only classification set -- *how many objects are there?*

Built for SHERL's CNN experiment (Diao et al., ECCV 2024, Sec. 3.3 "beyond Transformers",
Fig. 3b; :func:`vlkit.methods.sherl_study.study_cnn`): an ImageNet CNN has to adapt to it (the
count of shapes on a plain background is no ImageNet class, and the pooled features of a frozen
backbone mix the objects' colours and shapes with their number), yet a small training budget
should not saturate it.

Each row is one scene of :mod:`~vlkit.data.scenes` (``sample_scene`` with ``n_objects`` fixed
to the row's count, ``render``) and its label: the number of objects, one class per count in
``counts = [lo, hi]`` (default 1-4: four classes named ``"1"``..``"4"``). Labels are
**balanced by design**: split ``s`` of ``n`` rows takes the counts ``lo, lo+1, .., hi`` in turn
(``n // C`` of each, the first ``n % C`` counts once more) in a seeded random order, so every
count appears ``floor(n / C)`` or ``ceil(n / C)`` times. Everything else about a scene (cells,
shapes, colours, sizes, jitter, distractors -- copies of another object with one attribute
changed, so objects cannot be told apart by a single attribute) is drawn as for the other
generated sets. Each split has its own seed stream (:func:`vlkit.data.splits.split_rng`): the
same ``seed`` and knobs give identical rows, and the splits never share a draw.

Columns: ``image_id``, ``image`` (PNG), ``label`` (ClassLabel ``"lo".."hi"``: class ``i`` is
the count ``lo + i``), ``count``, ``scene`` (the objects' metadata).

Knobs (defaults in :data:`KNOBS`): ``counts`` [lo, hi] (1 <= lo < hi <= grid²), ``grid``
cells per side, ``distractors``, ``shapes`` / ``colours`` vocabulary, ``image_size`` pixels,
``n_train`` / ``n_val`` / ``n_test`` rows.
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .scenes import COLOURS, SHAPES, check_vocabulary, png_bytes, render, sample_scene
from .shapes import SCENE
from .splits import SPLITS, split_rng

NAME = "shapes_count"
VERSION = 1  # part of the set's key: bump it when the generated rows change
KNOBS = {"counts": (1, 4), "grid": 3, "distractors": 1, "shapes": SHAPES, "colours": COLOURS, "image_size": 64,
         "n_train": 2000, "n_val": 500, "n_test": 500}


def check_knobs(knobs: dict) -> dict:
    """Validated, normalised knobs (``counts`` as an int pair; sizes as ints)."""
    k = dict(knobs)
    k["grid"] = int(k["grid"])
    if k["grid"] < 1:
        raise ValueError(f"grid={k['grid']} must be >= 1")
    try:
        lo, hi = (int(v) for v in k["counts"])
    except (TypeError, ValueError):
        raise ValueError(f"counts={k['counts']!r} must be a pair [lo, hi] of ints") from None
    if not 1 <= lo < hi <= k["grid"] ** 2:
        raise ValueError(f"counts={[lo, hi]} must satisfy 1 <= lo < hi <= grid**2 = {k['grid'] ** 2} "
                         f"(at least two classes)")
    k["counts"] = (lo, hi)
    k["shapes"], k["colours"] = check_vocabulary(k["shapes"], k["colours"])
    for key in ("distractors", "image_size", "n_train", "n_val", "n_test"):
        k[key] = int(k[key])
        low = 0 if key == "distractors" else 1  # (datasets cannot reload an empty saved split)
        if k[key] < low:
            raise ValueError(f"{key}={k[key]} must be >= {low}")
    return k


def class_names(counts) -> list[str]:
    """``["lo", .., "hi"]``: class ``i`` is the count ``lo + i``."""
    lo, hi = counts
    return [str(c) for c in range(lo, hi + 1)]


def balanced_counts(rng: np.random.Generator, n: int, counts) -> np.ndarray:
    """``n`` counts from ``lo..hi``, each ``n // C`` or ``n // C + 1`` times, in a seeded order."""
    lo, hi = counts
    return lo + rng.permutation(np.arange(n) % (hi - lo + 1))


def _split(rng: np.random.Generator, n: int, k: dict) -> dict:
    cols: dict[str, list] = {"image_id": [], "image": [], "label": [], "count": [], "scene": []}
    for i, c in enumerate(balanced_counts(rng, n, k["counts"]).tolist()):
        scene = sample_scene(rng, (c, c), k["grid"], k["distractors"], k["shapes"], k["colours"])
        cols["image_id"].append(i)
        cols["image"].append({"bytes": png_bytes(render(scene, k["image_size"])), "path": None})
        cols["label"].append(c - k["counts"][0])
        cols["count"].append(c)
        cols["scene"].append(scene.records())
    return cols


def build(seed: int = 0, **knobs) -> DatasetDict:
    """All three splits of shapes_count (knobs completed by the registry)."""
    k = check_knobs({**KNOBS, **knobs})
    features = Features({"image_id": Value("int32"), "image": Image(),
                         "label": ClassLabel(names=class_names(k["counts"])), "count": Value("int32"),
                         "scene": SCENE})
    return DatasetDict({split: Dataset.from_dict(_split(split_rng(seed, NAME, split), k[f"n_{split}"], k),
                                                 features=features) for split in SPLITS})
