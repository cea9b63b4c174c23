"""easy-VQA (Zhou, 2020; the ``easy-vqa`` package): 64x64 images of one coloured shape,
questions about shape / colour / presence, 13 single-word answers.

The package has train (4,000 images, 38,575 questions) and test (1,000 images, 9,673
questions). ``val`` is carved from train **by image**: a seeded ``val_frac`` of the train
images (default 10%: 400) and all of their questions, so no image is in both train and val.

Columns
    image       the PNG (``datasets.Image``: decodes to a 64x64 RGB PIL image)
    question    str
    answer      str
    label       ``ClassLabel`` whose names are ``easy_vqa.get_answers()`` in the package's
                own order (answers.txt: circle, green, red, ...), so ``label`` indexes it
    image_id    int, the package's image id (ids restart at 0 in the test split)
    image_file  str, unique image key: the PNG path relative to ``easy_vqa/data``
                (``train/images/17.png``) -- the key for cached image features
Rows keep the package's question order.
"""

from __future__ import annotations

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .assets import package_dir, require_file
from .splits import check_fraction, rng_for

VERSION = 1  # part of every set's key: bump it when the generated rows change
KNOBS = {"val_frac": 0.1}


def check_knobs(knobs: dict) -> dict:
    return {"val_frac": check_fraction("val_frac", knobs["val_frac"])}


def build(seed: int = 0, *, val_frac: float = 0.1, **_) -> DatasetDict:
    root = package_dir("easy_vqa") / "data"
    require_file(root / "answers.txt", "easy_vqa")
    from easy_vqa import get_answers, get_test_questions, get_train_questions

    answers = get_answers()
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string"),
                         "label": ClassLabel(names=answers), "image_id": Value("int32"),
                         "image_file": Value("string")})
    train_q, test_q = get_train_questions(), get_test_questions()
    train_ids = sorted(set(train_q[2]))
    rng = rng_for(seed, "easyvqa")
    val_ids = set(rng.permutation(train_ids)[: round(val_frac * len(train_ids))].tolist())

    images: dict[str, bytes] = {}

    def columns(qs, source: str, keep) -> dict:
        cols = {k: [] for k in features}
        for q, a, i in zip(*qs):
            if not keep(i):
                continue
            rel = f"{source}/images/{i}.png"
            if rel not in images:
                images[rel] = require_file(root / rel, "easy_vqa").read_bytes()
            cols["image"].append({"bytes": images[rel], "path": None})
            cols["question"].append(q)
            cols["answer"].append(a)
            cols["label"].append(answers.index(a))
            cols["image_id"].append(i)
            cols["image_file"].append(rel)
        return cols

    parts = {"train": columns(train_q, "train", lambda i: i not in val_ids),
             "val": columns(train_q, "train", lambda i: i in val_ids),
             "test": columns(test_q, "test", lambda i: True)}
    return DatasetDict({s: Dataset.from_dict(c, features=features) for s, c in parts.items()})
