"""The real datasets: easy-VQA, movie-review sentiment, BBC News (row counts, split
hygiene, labels against the source files), each materialised once into a temp folder."""

import collections

import numpy as np
import pytest

from vlkit.data import fingerprint, load_all
from vlkit.data.assets import package_dir
from vlkit.data.easyvqa import build as build_easyvqa


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlkit-data")


@pytest.fixture(scope="module")
def easyvqa(data_dir):
    return load_all("easyvqa", data_dir=data_dir)


def test_easyvqa_row_counts_and_image_disjoint_val(easyvqa):
    assert len(easyvqa["train"]) + len(easyvqa["val"]) == 38_575
    assert len(easyvqa["test"]) == 9_673
    train_imgs, val_imgs = set(easyvqa["train"]["image_file"]), set(easyvqa["val"]["image_file"])
    assert len(val_imgs) == 400 and len(train_imgs) == 3_600 and not train_imgs & val_imgs
    assert all(f.startswith("train/") for f in val_imgs)
    assert len(set(easyvqa["test"]["image_file"])) == 1_000


def test_easyvqa_labels_index_the_package_answers(easyvqa):
    from easy_vqa import get_answers, get_test_questions

    answers = get_answers()
    test = easyvqa["test"]
    assert test.features["label"].names == answers and len(answers) == 13
    q, a, ids = get_test_questions()
    assert test["question"] == q and test["answer"] == a and test["image_id"] == ids
    assert [answers[i] for i in test["label"]] == a
    row = test[123]
    raw = (package_dir("easy_vqa") / "data" / row["image_file"]).read_bytes()
    from PIL import Image
    import io
    assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    assert row["image"].size == (64, 64)


def test_easyvqa_val_depends_on_seed_only():
    a, b, c = build_easyvqa(0)["val"], build_easyvqa(0)["val"], build_easyvqa(1)["val"]
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_movie_reviews(data_dir):
    dd = load_all("movie_reviews", data_dir=data_dir)
    rows = sum(len(dd[s]) for s in dd)
    assert rows == 10_605 - 37  # 37 snippets have a mean score of exactly 0
    assert dd["train"].features["label"].names == ["negative", "positive"]
    ids = [i for s in dd for i in dd[s]["id"]]
    assert len(set(ids)) == rows and max(ids) == 10_605
    overall = np.mean([y for s in dd for y in dd[s]["label"]])
    for s in dd:
        scores, labels = np.array(dd[s]["score"]), np.array(dd[s]["label"])
        assert (scores != 0).all() and (labels == (scores > 0)).all()
        assert abs(labels.mean() - overall) < 0.01  # stratified
    assert [len(dd[s]) for s in ("train", "val", "test")] == [8_454, 1_057, 1_057]
    first = dd["train"].filter(lambda r: r["id"] == 3)[0]
    assert first["text"] == "Effective but too tepid biopic" and first["label"] == 0


def test_bbc_news(data_dir):
    dd = load_all("bbc_news", data_dir=data_dir)
    names = dd["train"].features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    rows = [r for s in dd for r in dd[s]]
    assert len(rows) == 2_225
    per_class = collections.Counter(names[r["label"]] for r in rows)
    assert per_class == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert all(r["id"].split("/")[0] == names[r["label"]] for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["business/001"]["text"].startswith("Ad sales boost Time Warner profit")
    assert "\u00a315.8m" in by_id["sports/199"]["text"]  # the one latin-1 file, pound sign decoded
    for s in dd:  # stratified 80/10/10, shuffled
        assert abs(len(dd[s]) / 2_225 - {"train": 0.8, "val": 0.1, "test": 0.1}[s]) < 0.01
        assert len(set(dd[s]["label"][:50])) > 1
