"""The generated vision-language sets, built from :mod:`~vlkit.data.scenes` and
:mod:`~vlkit.data.grammar`. Each split is generated from its own seed stream
(:func:`vlkit.data.splits.split_rng`), so train, val and test never share a random draw.

shapes_nlvr (NLVR2-style, Suhr et al. 2019)
    two images + a statement -> true/false. For each statement group the statement type
    and its surface form (the number, negation, quantifier, relation or comparison) are
    drawn first; candidate statements are proposed from the pair's objects (often with one
    attribute swapped: near misses) and rejection-sampled until the truth value --
    computed on the scene metadata -- equals the group's anchor label (a seeded balanced
    permutation). With ``minimal_pairs`` (default) the same statement then gets a second
    row whose image pair is the anchor pair with one minimal edit (recolour / reshape /
    resize / move / remove / add one object) that flips the label, as NLVR2 pairs each
    sentence with image pairs of both labels: the labels are exactly balanced, the text
    alone carries no information (a text-only classifier scores 50%), and a model must
    ground the one edited object. Rows are shuffled; ``group`` links the two rows.
    Columns: pair_id, group, image_left, image_right, statement, label (ClassLabel
    false/true), kind, form, edit ("" for the anchor row, else "<side>: <edit>"),
    program (JSON), scene_left, scene_right.
shapes_retrieval (Flickr30K/COCO-style image-text retrieval)
    one image, ``n_captions`` (5) distinct true captions and as many hard negatives, each
    a one-slot mutation of a true caption that is false for the image (``negative_of``
    gives the caption index, ``negative_attribute`` the changed slot). Within val and test
    no caption text is repeated across images, so the default 100-image gallery x 500
    captions has one source image per caption (another image may still make a caption
    true: :func:`relevance` gives that multi-positive ground truth; on the default test
    gallery a caption is true of 1.2 images on average). Columns: image_id, image, captions, negatives,
    negative_of, negative_attribute, programs (JSON), scene.
shapes_captions (caption corpus for vision-language pre-training)
    one image + one true caption. Columns: image_id, image, caption, kind, scene.

Difficulty knobs (keyword arguments of :func:`vlkit.data.load`, defaults in ``KNOBS``):
``n_objects`` [lo, hi] objects per image, ``distractors`` one-attribute copies per image,
``grid`` cells per side, ``statement_types`` / ``caption_types`` enabled templates,
``minimal_pairs`` (nlvr) contrastive edited pairs, ``n_captions`` (retrieval),
``shapes`` / ``colours`` vocabulary, ``image_size`` pixels, ``n_train/n_val/n_test``.
"""

from __future__ import annotations

import json

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

from . import grammar as g
from .grammar import SIDES
from .scenes import COLOURS, SHAPES, Scene, check_vocabulary, edit_scene, png_bytes, render, sample_scene
from .splits import SPLITS, split_rng

VERSION = 1  # part of every set's key: bump it when the generated rows change
SCENE = List({"shape": Value("string"), "colour": Value("string"), "size": Value("string"),
              "row": Value("int32"), "col": Value("int32"), "x": Value("float64"), "y": Value("float64")})
_COMMON = {"n_objects": (3, 6), "grid": 3, "distractors": 1, "shapes": SHAPES, "colours": COLOURS,
           "image_size": 64}
KNOBS = {
    "shapes_nlvr": {**_COMMON, "statement_types": g.STATEMENT_KINDS, "minimal_pairs": True,
                    "n_train": 6000, "n_val": 1000, "n_test": 1000},
    "shapes_retrieval": {**_COMMON, "n_objects": (2, 5), "caption_types": ("list", "rel", "count"),
                         "n_captions": 5, "n_train": 3000, "n_val": 100, "n_test": 100},
    "shapes_captions": {**_COMMON, "n_objects": (2, 5), "caption_types": ("scene", "rel", "count"),
                        "n_train": 10000, "n_val": 1000, "n_test": 1000},
}
# Retrieval captions name >= 2 objects or count >= 2 objects, so that few gallery images
# besides the source make a caption true (measured on the default test gallery: see tests).
RETRIEVAL_LIST = (2, 3)
RETRIEVAL_COUNT_KEEPS = (("colour", "shape"), ("size", "colour", "shape"))
MAX_TRIES = 5000  # candidate statements / captions per row before giving up (never reached in practice)


def _check_choice(kind: str, values, valid) -> tuple:
    from vlkit.models.protocol import UnknownNameError

    values = tuple(values)
    for v in values:
        if v not in valid:
            raise UnknownNameError(kind, v, valid)
    if not values:
        raise ValueError(f"need at least one {kind}; valid: {', '.join(valid)}")
    return values


def check_knobs(name: str, knobs: dict) -> dict:
    k = dict(knobs)
    lo, hi = (int(v) for v in k["n_objects"])
    k["grid"] = int(k["grid"])
    if not 1 <= lo <= hi <= k["grid"] ** 2:
        raise ValueError(f"n_objects={list(k['n_objects'])} must satisfy 1 <= lo <= hi <= grid**2 = {k['grid'] ** 2}")
    if name != "shapes_nlvr" and lo < 2 and "rel" in k["caption_types"]:
        raise ValueError(f"n_objects={[lo, hi]}: relation captions need at least 2 objects per image")
    k["n_objects"] = (lo, hi)
    k["shapes"], k["colours"] = check_vocabulary(k["shapes"], k["colours"])
    if name == "shapes_nlvr":
        k["minimal_pairs"] = bool(k["minimal_pairs"])
        k["statement_types"] = _check_choice("statement type", k["statement_types"], g.STATEMENT_KINDS)
    else:
        k["caption_types"] = _check_choice("caption type", k["caption_types"], g.CAPTION_KINDS)
    for key in ("distractors", "image_size", "n_train", "n_val", "n_test", "n_captions"):
        if key in k:
            k[key] = int(k[key])
            low = 0 if key == "distractors" else 1  # (datasets cannot reload an empty saved split)
            if k[key] < low:
                raise ValueError(f"{key}={k[key]} must be >= {low}")
    if k.get("n_captions", 1) > 10:
        raise ValueError(f"n_captions={k['n_captions']} must be <= 10 (small scenes have few distinct captions)")
    return k


def _scene(rng, k) -> Scene:
    return sample_scene(rng, k["n_objects"], k["grid"], k["distractors"], k["shapes"], k["colours"])


def _image(scene: Scene, k) -> dict:
    return {"bytes": png_bytes(render(scene, k["image_size"])), "path": None}


def _nlvr_anchor(rng, k, kind, form, target: bool):
    """A scene pair and a statement of ``kind``/``form`` whose truth is ``target``."""
    for attempt in range(MAX_TRIES):
        if attempt % 25 == 0:  # a fresh pair now and then: some forms need particular scenes
            left, right = _scene(rng, k), _scene(rng, k)
        p = g.propose_statement(kind, form, rng, left, right, k["shapes"], k["colours"])
        if g.statement_truth(p, left, right) == target:
            return left, right, p
    raise RuntimeError(f"no {target} {kind} statement of form {form!r} in {MAX_TRIES} tries")


def _nlvr_flip(rng, k, p, left, right, tries: int = 60):
    """One minimal edit of one image of the pair that flips the statement's truth, or None."""
    truth = g.statement_truth(p, left, right)
    for _ in range(tries):
        side = p.get("side") or SIDES[int(rng.integers(2))]
        scene = left if side == "left" else right
        edited, what = edit_scene(scene, rng, k["n_objects"], k["shapes"], k["colours"])
        new = (edited, right) if side == "left" else (left, edited)
        if g.statement_truth(p, *new) != truth:
            return (*new, f"{side}: {what}")
    return None


def _nlvr_split(rng: np.random.Generator, n: int, k: dict) -> dict:
    """Rows come in groups: with ``minimal_pairs`` each statement appears twice, once with
    its anchor pair and once with a minimally edited pair of the opposite label (so the
    statement text alone carries no information about the label); the anchor labels are
    a seeded balanced permutation, so the edited row is the false one half of the time."""
    per_group = 2 if k["minimal_pairs"] else 1
    n_groups = -(-n // per_group)
    anchors = rng.permutation(np.arange(n_groups) % 2)
    kinds = k["statement_types"]
    rows = []
    for gi in range(n_groups):
        target = bool(anchors[gi])
        kind = kinds[int(rng.integers(len(kinds)))]
        forms = g.FORMS[kind]
        form = forms[int(rng.integers(len(forms)))]
        while True:
            left, right, p = _nlvr_anchor(rng, k, kind, form, target)
            group = [(left, right, target, "")]
            if per_group == 2:
                flipped = _nlvr_flip(rng, k, p, left, right)
                if flipped is None:
                    continue
                group.append((flipped[0], flipped[1], not target, flipped[2]))
            break
        rows += [(gi, kind, form, p, *row) for row in group]
    rows = rows[:n]
    cols = {c: [] for c in FEATURES["shapes_nlvr"]}
    for i in rng.permutation(len(rows)):
        gi, kind, form, p, left, right, label, edit = rows[i]
        cols["pair_id"].append(len(cols["pair_id"]))
        cols["group"].append(gi)
        cols["image_left"].append(_image(left, k))
        cols["image_right"].append(_image(right, k))
        cols["statement"].append(g.statement_text(p))
        cols["label"].append(int(label))
        cols["kind"].append(kind)
        cols["form"].append(str(form))
        cols["edit"].append(edit)
        cols["program"].append(json.dumps(p, sort_keys=True))
        cols["scene_left"].append(left.records())
        cols["scene_right"].append(right.records())
    return cols


def _retrieval_row(rng, k, used: set[str] | None):
    """(scene, captions, negatives) or None when this scene cannot give enough of them."""
    scene = _scene(rng, k)
    kinds = k["caption_types"]
    caps: list[dict] = []
    texts: set[str] = set()
    for _ in range(200):
        if len(caps) == k["n_captions"]:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "rel" and len(scene.objects) < 2:
            continue
        p = g.propose_caption(kind, rng, scene, RETRIEVAL_LIST, RETRIEVAL_COUNT_KEEPS)
        if kind == "count" and p["n"] < 2:  # "exactly one red circle" is true of too many images
            continue
        t = g.caption_text(p)
        if t not in texts and (used is None or t not in used):
            caps.append(p)
            texts.add(t)
    if len(caps) < k["n_captions"]:
        return None
    negs = []
    avoid = set(texts)
    for j, p in enumerate(caps):
        found = g.hard_negative(p, scene, rng, avoid, k["shapes"], k["colours"])
        if found is None:
            return None
        q, attr = found
        avoid.add(g.caption_text(q))
        negs.append((j, q, attr))
    return scene, caps, negs


def _retrieval_split(rng: np.random.Generator, n: int, k: dict, unique: bool) -> dict:
    cols = {c: [] for c in ("image_id", "image", "captions", "negatives", "negative_of", "negative_attribute",
                            "programs", "scene")}
    used: set[str] | None = set() if unique else None
    for i in range(n):
        for _ in range(MAX_TRIES):
            row = _retrieval_row(rng, k, used)
            if row is not None:
                break
        else:
            raise RuntimeError(f"could not draw {k['n_captions']} distinct captions in {MAX_TRIES} scenes")
        scene, caps, negs = row
        texts = [g.caption_text(p) for p in caps]
        if used is not None:
            used.update(texts)
        cols["image_id"].append(i)
        cols["image"].append(_image(scene, k))
        cols["captions"].append(texts)
        cols["negatives"].append([g.caption_text(q) for _, q, _ in negs])
        cols["negative_of"].append([j for j, _, _ in negs])
        cols["negative_attribute"].append([a for _, _, a in negs])
        cols["programs"].append(json.dumps({"captions": caps, "negatives": [q for _, q, _ in negs]}, sort_keys=True))
        cols["scene"].append(scene.records())
    return cols


def _captions_split(rng: np.random.Generator, n: int, k: dict) -> dict:
    cols = {c: [] for c in ("image_id", "image", "caption", "kind", "scene")}
    kinds = k["caption_types"]
    for i in range(n):
        scene = _scene(rng, k)
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "rel" and len(scene.objects) < 2:
            kind = "scene"
        p = g.propose_caption(kind, rng, scene)
        cols["image_id"].append(i)
        cols["image"].append(_image(scene, k))
        cols["caption"].append(g.caption_text(p))
        cols["kind"].append(kind)
        cols["scene"].append(scene.records())
    return cols


FEATURES = {
    "shapes_nlvr": Features({"pair_id": Value("int32"), "group": Value("int32"), "image_left": Image(),
                             "image_right": Image(), "statement": Value("string"),
                             "label": ClassLabel(names=["false", "true"]), "kind": Value("string"),
                             "form": Value("string"), "edit": Value("string"), "program": Value("string"),
                             "scene_left": SCENE, "scene_right": SCENE}),
    "shapes_retrieval": Features({"image_id": Value("int32"), "image": Image(), "captions": List(Value("string")),
                                  "negatives": List(Value("string")), "negative_of": List(Value("int32")),
                                  "negative_attribute": List(Value("string")), "programs": Value("string"),
                                  "scene": SCENE}),
    "shapes_captions": Features({"image_id": Value("int32"), "image": Image(), "caption": Value("string"),
                                 "kind": Value("string"), "scene": SCENE}),
}


def build(name: str, seed: int = 0, **knobs) -> DatasetDict:
    """All three splits of generated set ``name`` (knobs already completed by the registry)."""
    k = check_knobs(name, knobs)
    out = {}
    for split in SPLITS:
        rng, n = split_rng(seed, name, split), k[f"n_{split}"]
        if name == "shapes_nlvr":
            cols = _nlvr_split(rng, n, k)
        elif name == "shapes_retrieval":
            cols = _retrieval_split(rng, n, k, unique=split != "train")
        else:
            cols = _captions_split(rng, n, k)
        out[split] = Dataset.from_dict(cols, features=FEATURES[name])
    return DatasetDict(out)


def build_nlvr(seed: int = 0, **knobs) -> DatasetDict:
    return build("shapes_nlvr", seed, **knobs)


def build_retrieval(seed: int = 0, **knobs) -> DatasetDict:
    return build("shapes_retrieval", seed, **knobs)


def build_captions(seed: int = 0, **knobs) -> DatasetDict:
    return build("shapes_captions", seed, **knobs)


def relevance(ds: Dataset) -> np.ndarray:
    """``(n_images * n_captions, n_images)`` bool matrix of a shapes_retrieval split: entry
    ``[i * n_captions + j, m]`` is whether caption j of image i is true of image m (computed
    on the scene metadata), for R@K with every true image counted as a hit."""
    scenes = [Scene.from_records(r) for r in ds["scene"]]
    progs = [p for js in ds["programs"] for p in json.loads(js)["captions"]]
    return np.array([[g.caption_truth(p, s) for s in scenes] for p in progs], dtype=bool)
