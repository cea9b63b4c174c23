"""The generated sets (shapes_nlvr, shapes_retrieval, shapes_captions) at small sizes,
materialised into temporary folders: labels checked against an independent oracle,
balance, hard negatives, determinism."""

import collections
import json

import numpy as np
import pytest
import shapes_oracle as oracle

from vlkit.data import fingerprint, load, load_all, materialise
from vlkit.data.shapes import relevance

SMALL = {
    "shapes_nlvr": {"n_train": 300, "n_val": 40, "n_test": 40},
    "shapes_retrieval": {"n_train": 60, "n_val": 20, "n_test": 100},
    "shapes_captions": {"n_train": 200, "n_val": 20, "n_test": 20},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlkit-data")


@pytest.fixture(scope="module")
def nlvr(data_dir):
    return load_all("shapes_nlvr", data_dir=data_dir, **SMALL["shapes_nlvr"])


@pytest.fixture(scope="module")
def retrieval(data_dir):
    return load_all("shapes_retrieval", data_dir=data_dir, **SMALL["shapes_retrieval"])


def test_nlvr_labels_agree_with_independent_oracle(nlvr):
    for split, ds in nlvr.items():
        rows = ds.remove_columns(["image_left", "image_right"])
        for r in rows:
            assert oracle.statement(r["statement"], r["scene_left"], r["scene_right"]) == bool(r["label"]), (split, r)


def test_nlvr_balanced_and_minimal_pairs(nlvr):
    ds = nlvr["train"].remove_columns(["image_left", "image_right"])
    labels = np.array(ds["label"])
    assert labels.sum() == len(labels) // 2
    by_kind = collections.defaultdict(list)
    for k, y in zip(ds["kind"], labels):
        by_kind[k].append(y)
    assert set(by_kind) == {"count", "exist", "pair", "spatial", "compare"}
    assert all(abs(np.mean(v) - 0.5) < 0.15 for v in by_kind.values()), {k: np.mean(v) for k, v in by_kind.items()}
    groups = collections.defaultdict(list)
    for r in ds:
        groups[r["group"]].append(r)
    assert len(groups) == 150
    for a, b in groups.values():
        assert a["statement"] == b["statement"] and a["label"] != b["label"]
        edited = a if a["edit"] else b
        anchor = b if a["edit"] else a
        assert not anchor["edit"] and edited["edit"]
        side = edited["edit"].split(":")[0]
        other = "right" if side == "left" else "left"
        assert edited[f"scene_{other}"] == anchor[f"scene_{other}"]  # the other image is untouched
        key = lambda o: (o["shape"], o["colour"], o["size"], o["row"], o["col"])  # noqa: E731
        before = collections.Counter(map(key, anchor[f"scene_{side}"]))
        after = collections.Counter(map(key, edited[f"scene_{side}"]))
        assert 1 <= sum((before - after).values()) + sum((after - before).values()) <= 2


def test_nlvr_without_minimal_pairs_still_balanced(tmp_path):
    ds = load("shapes_nlvr", "val", data_dir=tmp_path, minimal_pairs=False, n_train=1, n_val=101, n_test=1,
              statement_types=["count", "spatial"], n_objects=[4, 8], distractors=3)
    labels = np.array(ds["label"])
    assert abs(labels.sum() - 50.5) <= 0.5 and set(ds["kind"]) == {"count", "spatial"}
    assert all(4 <= len(s) <= 8 for s in ds["scene_left"])
    for r in ds.remove_columns(["image_left", "image_right"]):
        assert oracle.statement(r["statement"], r["scene_left"], r["scene_right"]) == bool(r["label"])


def test_nlvr_images_are_the_scenes(nlvr):
    r = nlvr["val"][0]
    assert r["image_left"].size == (64, 64) and r["image_left"].mode == "RGB"
    from vlkit.data.scenes import Scene, render
    assert np.array_equal(np.asarray(r["image_left"]), np.asarray(render(Scene.from_records(r["scene_left"]))))


def test_retrieval_captions_true_negatives_false_one_slot(retrieval):
    for split, ds in retrieval.items():
        for r in ds.remove_columns(["image"]):
            caps, negs = r["captions"], r["negatives"]
            assert len(caps) == 5 == len(set(caps)) and len(negs) == 5
            assert not set(caps) & set(negs)
            for c in caps:
                assert oracle.caption(c, r["scene"]), c
            for neg, j, attr in zip(negs, r["negative_of"], r["negative_attribute"]):
                assert not oracle.caption(neg, r["scene"]), neg
                (ka, a), (kb, b) = oracle.parse_caption(caps[j]), oracle.parse_caption(neg)
                diff = [x for x, y in zip(a, b) if x != y]
                assert ka == kb and len(a) == len(b) and len(diff) == 1 and diff[0][0] == attr, (caps[j], neg)


def test_retrieval_gallery_captions_unique_and_relevance(retrieval):
    test = retrieval["test"]
    caps = [c for cs in test["captions"] for c in cs]
    assert len(test) == 100 and len(caps) == 500 == len(set(caps))  # the fixed 100 x 500 gallery
    rel = relevance(test)
    assert rel.shape == (500, 100)
    assert all(rel[i * 5 + j, i] for i in range(100) for j in range(5))
    assert rel.sum(1).mean() < 1.6  # captions name few images besides their own


def test_captions_are_true(data_dir):
    ds = load("shapes_captions", "train", data_dir=data_dir, **SMALL["shapes_captions"])
    assert len(ds) == 200 and set(ds["kind"]) == {"scene", "rel", "count"}
    for r in ds.remove_columns(["image"]):
        assert oracle.caption(r["caption"], r["scene"]), r


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_rows_in_fresh_folders(tmp_path, name):
    knobs = {k: min(v, 30) for k, v in SMALL[name].items()}
    a = load_all(name, data_dir=tmp_path / "a", seed=5, **knobs)
    b = load_all(name, data_dir=tmp_path / "b", seed=5, **knobs)
    c = load_all(name, data_dir=tmp_path / "c", seed=6, **knobs)
    for split in ("train", "val", "test"):
        assert fingerprint(a[split]) == fingerprint(b[split]) != fingerprint(c[split])
    assert fingerprint(a["train"]) != fingerprint(a["test"])  # splits come from different seed streams
    folder = materialise(name, data_dir=tmp_path / "a", seed=5, **knobs)
    assert json.loads((folder / "spec.json").read_text())["seed"] == 5
    assert not [p for p in (tmp_path / "a" / name).iterdir() if p.name.startswith(".tmp")]
