"""Cached EfficientNet-Lite0 cells: pixels (hand-worked), the cells equal the CNN's output, the
cache equals image_features() in float16, row mapping (per image for easy-VQA, per row and per
side for the generated sets), atomic files keyed by the dataset spec, the CLI, and bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from vlkit.data import features as F
from vlkit.data import load
from vlkit.models.cnn import CELL_DIM, cell_features, efficientnet_lite0
from vlkit.models.protocol import UnknownNameError

TINY = {"shapes_nlvr": dict(n_train=2, n_val=4, n_test=2), "shapes_captions": dict(n_train=2, n_val=5, n_test=2)}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def rand_images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


# ---------------------------------------------------------------------------- pixels
def test_to_pixels_by_hand():
    """A solid (10, 20, 30) image stays solid through the bicubic resize; a size x size image
    is not resampled; every input kind gives the same pixels."""
    solid = np.zeros((64, 64, 3), dtype=np.uint8) + np.array([10, 20, 30], dtype=np.uint8)
    px = F.to_pixels([solid], 128)
    assert px.shape == (1, 3, 128, 128) and px.dtype == torch.float32
    assert px[0, :, 0, 0].tolist() == [10.0, 20.0, 30.0] and bool((px[0] == px[0, :, :1, :1]).all())
    img = rand_images(1, 128)[0]
    assert torch.equal(F.to_pixels([img], 128)[0], torch.from_numpy(img).permute(2, 0, 1).float())
    kinds = [img, PILImage.fromarray(img), {"bytes": png(img), "path": None}]
    assert all(torch.equal(F.to_pixels([k], 128), F.to_pixels([img], 128)) for k in kinds)
    with pytest.raises(TypeError, match="cannot read an image from int"):
        F.to_pixels([3], 128)
    with pytest.raises(ValueError, match="size must be a positive"):
        F.to_pixels([img], 0)


def test_image_features_are_the_cnn_output():
    imgs = rand_images(5)
    got = F.image_features(imgs, 64, batch_size=2)
    assert got.shape == (5, 4, CELL_DIM) and got.dtype == torch.float32
    want = cell_features(efficientnet_lite0(), F.to_pixels(imgs, 64))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert F.image_features(imgs[:1], 128).shape == (1, 16, CELL_DIM)


# ---------------------------------------------------------------------------- generated sets
def test_cached_nlvr_left_right(data_dir):
    kn = TINY["shapes_nlvr"]
    feats = F.cached_features("shapes_nlvr", "val", 64, data_dir=data_dir, progress=False, **kn)
    ds = load("shapes_nlvr", "val", data_dir=data_dir, **kn)
    assert feats.shape == (len(ds), 2, 4, CELL_DIM) and feats.dtype == torch.float16
    for j, col in enumerate(("image_left", "image_right")):
        assert torch.equal(feats[:, j], F.image_features(ds[col], 64).half())
    assert torch.equal(F.feature_rows("shapes_nlvr", ds), torch.arange(len(ds)))


def test_cache_is_read_back_not_recomputed(data_dir, monkeypatch):
    kn = TINY["shapes_captions"]
    first = F.cached_features("shapes_captions", "val", 64, data_dir=data_dir, progress=False, **kn).clone()
    path = F.features_path("shapes_captions", "val", 64, data_dir=data_dir, **kn)
    assert path.parent.parent == data_dir / "features" / "shapes_captions"
    assert sorted(p.name for p in path.parent.iterdir()) == ["val-64.json", "val-64.npy"]  # no .tmp-* left
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["shape"] == [5, 4, CELL_DIM] and meta["dataset"]["knobs"]["n_val"] == 5

    monkeypatch.setattr(F, "_compute", lambda *a, **k: pytest.fail("recomputed a cached file"))
    again = F.cached_features("shapes_captions", "val", 64, data_dir=data_dir, **kn)
    assert torch.equal(again, first)
    again[0] = 0  # copy-on-write map: the file is untouched
    assert torch.equal(F.cached_features("shapes_captions", "val", 64, data_dir=data_dir, **kn), first)


def test_other_knobs_get_another_file(data_dir):
    a = F.features_path("shapes_captions", "val", 64, data_dir=data_dir, **TINY["shapes_captions"])
    b = F.features_path("shapes_captions", "val", 64, data_dir=data_dir, n_val=6)
    c = F.features_path("shapes_captions", "val", 64, data_dir=data_dir, seed=1, **TINY["shapes_captions"])
    assert len({a.parent, b.parent, c.parent}) == 3 and a.name == b.name == "val-64.npy"


def test_corrupt_cache_says_delete(tmp_path):
    kn = TINY["shapes_captions"]
    path = F.features_path("shapes_captions", "test", 64, data_dir=tmp_path, **kn)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(RuntimeError, match="delete it to recompute"):
        F.cached_features("shapes_captions", "test", 64, data_dir=tmp_path, **kn)
    np.save(path, np.zeros((2, 3, 7), dtype=np.float16))
    with pytest.raises(RuntimeError, match=r"\(2, 3, 7\).*delete it"):
        F.cached_features("shapes_captions", "test", 64, data_dir=tmp_path, **kn)


# ---------------------------------------------------------------------------- easy-VQA (stand-in rows)
def fake_easyvqa(monkeypatch):
    """easy-VQA-shaped splits: train and val share the package's train images (ids 0..3), val
    holds image 3; several questions per image; test has its own ids."""
    imgs = rand_images(6, seed=3)
    feats = Features({"image": Image(), "question": Value("string"), "image_id": Value("int32")})

    def rows(ids, offset=0):
        return Dataset.from_dict({"image": [{"bytes": png(imgs[i + offset]), "path": None} for i in ids],
                                  "question": [f"q{i}" for i in ids], "image_id": list(ids)}, features=feats)

    splits = {"train": rows([2, 0, 1, 2, 0]), "val": rows([3, 3]), "test": rows([1, 0, 1], offset=4)}
    monkeypatch.setattr(F, "load", lambda name, split, **kw: splits[split])
    return imgs, splits


def test_easyvqa_cells_per_image(tmp_path, monkeypatch):
    imgs, splits = fake_easyvqa(monkeypatch)
    train = F.cached_features("easyvqa", "train", 64, data_dir=tmp_path, progress=False)
    assert train.shape == (4, 4, CELL_DIM)  # one row per train image, indexed by image_id
    torch.testing.assert_close(train.float(), F.image_features(imgs[:4], 64), atol=3e-3, rtol=1e-3)
    val = F.cached_features("easyvqa", "val", 64, data_dir=tmp_path)
    assert torch.equal(val, train)  # the same pool, the same file
    assert F.features_path("easyvqa", "val", 64, data_dir=tmp_path).name == "train-64.npy"
    rows = F.feature_rows("easyvqa", splits["train"])
    assert rows.tolist() == [2, 0, 1, 2, 0]
    assert torch.equal(train[rows][3], train[2])
    test = F.cached_features("easyvqa", "test", 64, data_dir=tmp_path, progress=False)
    assert test.shape == (2, 4, CELL_DIM)
    torch.testing.assert_close(test.float(), F.image_features(imgs[4:], 64), atol=3e-3, rtol=1e-3)


def test_easyvqa_ids_with_a_hole(tmp_path, monkeypatch):
    _, splits = fake_easyvqa(monkeypatch)
    splits["val"] = splits["val"].map(lambda r: {"image_id": 7})
    with pytest.raises(ValueError, match="image ids are not 0..3"):
        F.cached_features("easyvqa", "train", 64, data_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------- CLI and bad input
def test_cli(tmp_path, capsys):
    knobs = tmp_path / "knobs.yaml"
    knobs.write_text(json.dumps({"shapes_captions": TINY["shapes_captions"]}))
    rc = F.main(["--dataset", "shapes_captions", "--split", "val", "--size", "64", "--data-dir", str(tmp_path),
                 "--features-dir", str(tmp_path / "cells"), "--knobs", str(knobs)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "shapes_captions" in out and "(5, 4, 1280)" in out
    assert list((tmp_path / "cells" / "shapes_captions").glob("*/val-64.npy"))


def test_bad_names():
    with pytest.raises(UnknownNameError, match="'bbc_news'.*easyvqa, shapes_nlvr"):
        F.cached_features("bbc_news", "train")
    with pytest.raises(UnknownNameError, match="'dev'.*train, val, test"):
        F.features_path("easyvqa", "dev")
    with pytest.raises(UnknownNameError, match="n_images"):
        F.features_path("shapes_captions", "val", n_images=3)
    with pytest.raises(ValueError, match="size must be a positive"):
        F.features_path("easyvqa", "val", size=-1)
