"""shapes_count (how many objects): identical rows for a seed, balanced labels as designed
(floor / ceil of n / C per count), labels that are the scene's object count, images that are
the scene rendered, and knob errors."""

import numpy as np
import pytest
from PIL import ImageChops

from vlkit.data import fingerprint, load, load_all
from vlkit.data.counting import balanced_counts, class_names
from vlkit.data.scenes import Scene, render
from vlkit.models.protocol import UnknownNameError

SMALL = {"n_train": 30, "n_val": 8, "n_test": 12}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlkit-data")


@pytest.fixture(scope="module")
def count(data_dir):
    return load_all("shapes_count", data_dir=data_dir, **SMALL)


def test_identical_for_a_seed_different_for_another(count, tmp_path):
    again = load_all("shapes_count", data_dir=tmp_path / "a", **SMALL)  # rebuilt from scratch elsewhere
    other = load_all("shapes_count", data_dir=tmp_path / "b", seed=1, **SMALL)
    for split in ("train", "val", "test"):
        assert fingerprint(again[split]) == fingerprint(count[split])
        assert fingerprint(other[split]) != fingerprint(count[split])
    assert fingerprint(count["val"]) != fingerprint(count["test"])  # own seed stream per split


def test_labels_balanced_as_designed(count):
    # 30 rows, 4 counts: 30 = 4*7 + 2 -> the counts 1 and 2 eight times, 3 and 4 seven times;
    # 8 rows: twice each; 12 rows: three times each
    assert np.bincount(count["train"]["label"]).tolist() == [8, 8, 7, 7]
    assert np.bincount(count["val"]["label"]).tolist() == [2, 2, 2, 2]
    assert np.bincount(count["test"]["label"]).tolist() == [3, 3, 3, 3]
    assert count["train"].features["label"].names == ["1", "2", "3", "4"] == class_names((1, 4))
    rng = np.random.default_rng(0)
    c = balanced_counts(rng, 11, (2, 6))  # 5 classes: 11 = 5*2 + 1 -> count 2 three times
    assert sorted(c.tolist()) == [2, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_label_is_the_object_count_and_image_the_rendered_scene(count):
    for split, ds in count.items():
        for r in ds:
            assert r["count"] == len(r["scene"]) == r["label"] + 1, (split, r["image_id"])
        for r in ds.select(range(3)):
            img = render(Scene.from_records(r["scene"], grid=3), 64)
            assert ImageChops.difference(img, r["image"].convert("RGB")).getbbox() is None


def test_knobs_change_the_classes_and_bad_knobs_fail(tmp_path):
    two = load("shapes_count", "val", data_dir=tmp_path, counts=[2, 3], grid=2, image_size=32, n_train=2, n_val=4,
               n_test=2)
    assert two.features["label"].names == ["2", "3"] and sorted(two["count"]) == [2, 2, 3, 3]
    assert two[0]["image"].size == (32, 32)
    with pytest.raises(ValueError, match=r"counts=\[0, 3\] must satisfy 1 <= lo < hi <= grid\*\*2 = 9"):
        load("shapes_count", "train", data_dir=tmp_path, counts=[0, 3])
    with pytest.raises(ValueError, match=r"counts=\[2, 5\].*grid\*\*2 = 4"):
        load("shapes_count", "train", data_dir=tmp_path, counts=[2, 5], grid=2)
    with pytest.raises(ValueError, match=r"counts=\[3, 3\].*at least two classes"):
        load("shapes_count", "train", data_dir=tmp_path, counts=[3, 3])
    with pytest.raises(UnknownNameError, match="unknown shapes_count knob 'n_objects'.*counts"):
        load("shapes_count", "train", data_dir=tmp_path, n_objects=[1, 4])
    with pytest.raises(ValueError, match="n_test=0 must be >= 1"):
        load("shapes_count", "train", data_dir=tmp_path, n_test=0)
