"""Statements and captions about scenes: programs, their text and their truth.

Every sentence is generated from a small *program* (a JSON-able dict); the text is a
deterministic rendering of it and the truth value is computed from the program and the
scene metadata, never assumed from how the program was built. Programs refer to objects
through *descriptions*: any non-empty subset of ``{size, colour, shape}``
(``{"size": None, "colour": "red", "shape": "circle"}`` reads "red circle"; with no shape
the noun is "shape").

NLVR2-style statements about an image pair (Suhr et al., ACL 2019 -- NLVR2 statements
mix counting, existence, spatial relations and comparisons across the two images):

=========  =====================================================================
kind       text (``form`` is the surface choice the label is balanced within)
=========  =====================================================================
count      "the left image contains exactly two red circles."         form: n
exist      "the left image contains a red circle." /
           "the left image contains no red circles."                  form: negated
pair       "both images contain a red circle." / "exactly one image contains a
           red circle." / "neither image contains a red circle."      form: quantifier
spatial    "in the left image, a red circle is to the left of a blue square."
                                                                      form: relation
compare    "the left image contains more red circles than the right image." /
           "... fewer ... than the right image." / "the left image contains the
           same number of red circles as the right image."            form: more|fewer|same
=========  =====================================================================

Captions about one image (retrieval and pre-training):
``list`` "a large red circle and a small blue square." (distinct objects match),
``scene`` the ``list`` of every object in reading order, ``rel`` "a large red circle to
the left of a small blue square.", ``count`` "exactly two red circles.".

Semantics: a description matches an object when every specified attribute is equal;
"a X rel a Y" holds when two *distinct* objects match X and Y with the relation between
their grid cells (:mod:`vlkit.data.scenes`); counts are exact.

A *hard negative* of a caption changes exactly one slot of its program -- one attribute
of one description (size, colour, shape), the relation, or the number -- and is kept only
if it is false for the image (the retrieval hard negatives of e.g. Wang et al.'s
EfficientVLM pre-training / ITM hard-negative mining, made exact here).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .scenes import ATTRIBUTES, COLOURS, SHAPES, SIZES, Obj, Scene

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("to the left of", "to the right of", "above", "below")
STATEMENT_KINDS = ("count", "exist", "pair", "spatial", "compare")
CAPTION_KINDS = ("scene", "list", "rel", "count")
SIDES = ("left", "right")
FORMS = {
    "count": (1, 2, 3),
    "exist": (False, True),
    "pair": ("both", "one", "neither"),
    "spatial": RELATIONS,
    "compare": ("more", "fewer", "same"),
}


# --------------------------------------------------------------------------- descriptions
def desc_text(d: dict, plural: bool = False) -> str:
    noun = d["shape"] or "shape"
    return " ".join([w for w in (d["size"], d["colour"]) if w] + [noun + ("s" if plural else "")])


def matches(d: dict, o: Obj) -> bool:
    return all(d[a] is None or d[a] == getattr(o, a) for a in ATTRIBUTES)


def count(d: dict, scene: Scene) -> int:
    return sum(matches(d, o) for o in scene.objects)


def full_desc(o: Obj) -> dict:
    return {"size": o.size, "colour": o.colour, "shape": o.shape}


def holds(rel: str, a: Obj, b: Obj) -> bool:
    """Spatial relation between two objects, on their grid cells."""
    return {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[rel]


def related(a: dict, rel: str, b: dict, scene: Scene) -> bool:
    objs = scene.objects
    return any(i != j and matches(a, x) and matches(b, y) and holds(rel, x, y)
               for i, x in enumerate(objs) for j, y in enumerate(objs))


def all_distinct_match(descs: Sequence[dict], scene: Scene) -> bool:
    """True iff distinct objects match each description (brute force; scenes are small)."""
    objs = scene.objects
    return any(all(matches(d, objs[i]) for d, i in zip(descs, perm))
               for perm in itertools.permutations(range(len(objs)), len(descs)))


# --------------------------------------------------------------------------- statements
def statement_text(p: dict) -> str:
    k = p["kind"]
    if k == "count":
        return f"the {p['side']} image contains exactly {NUMBERS[p['n']]} {desc_text(p['desc'], p['n'] != 1)}."
    if k == "exist":
        if p["negated"]:
            return f"the {p['side']} image contains no {desc_text(p['desc'], True)}."
        return f"the {p['side']} image contains a {desc_text(p['desc'])}."
    if k == "pair":
        head = {"both": "both images contain", "one": "exactly one image contains",
                "neither": "neither image contains"}[p["quant"]]
        return f"{head} a {desc_text(p['desc'])}."
    if k == "spatial":
        return f"in the {p['side']} image, a {desc_text(p['a'])} is {p['rel']} a {desc_text(p['b'])}."
    if k == "compare":
        pl = desc_text(p["desc"], True)
        if p["cmp"] == "same":
            return f"the left image contains the same number of {pl} as the right image."
        return f"the left image contains {p['cmp']} {pl} than the right image."
    raise ValueError(f"unknown statement kind {k!r}")


def statement_truth(p: dict, left: Scene, right: Scene) -> bool:
    k = p["kind"]
    side = {"left": left, "right": right}
    if k == "count":
        return count(p["desc"], side[p["side"]]) == p["n"]
    if k == "exist":
        return (count(p["desc"], side[p["side"]]) > 0) != p["negated"]
    if k == "pair":
        hits = (count(p["desc"], left) > 0) + (count(p["desc"], right) > 0)
        return hits == {"both": 2, "one": 1, "neither": 0}[p["quant"]]
    if k == "spatial":
        return related(p["a"], p["rel"], p["b"], side[p["side"]])
    if k == "compare":
        cl, cr = count(p["desc"], left), count(p["desc"], right)
        return {"more": cl > cr, "fewer": cl < cr, "same": cl == cr}[p["cmp"]]
    raise ValueError(f"unknown statement kind {k!r}")


def _propose_desc(rng, pool: Sequence[Obj], shapes, colours, perturb: float = 0.5) -> dict:
    """A description derived from a real object (random attribute subset), one attribute of
    which is swapped with probability ``perturb`` -- near misses make false statements hard."""
    o = pool[int(rng.integers(len(pool)))]
    keep = rng.random(3) < (0.4, 0.7, 0.85)  # size, colour, shape
    d = {a: (getattr(o, a) if kept else None) for a, kept in zip(ATTRIBUTES, keep)}
    if not keep.any():
        d["shape"] = o.shape
    if rng.random() < perturb:
        _swap_attribute(rng, d, [a for a in ATTRIBUTES if d[a] is not None], shapes, colours)
    return d


def _swap_attribute(rng, d: dict, slots: list[str], shapes, colours) -> str:
    a = slots[int(rng.integers(len(slots)))]
    vocab = {"size": SIZES, "colour": colours, "shape": shapes}[a]
    others = [v for v in vocab if v != d[a]]
    d[a] = others[int(rng.integers(len(others)))]
    return a


def propose_statement(kind: str, form, rng: np.random.Generator, left: Scene, right: Scene,
                      shapes=SHAPES, colours=COLOURS) -> dict:
    """One candidate statement of ``kind`` with surface ``form``; its label is whatever
    :func:`statement_truth` says (the caller rejection-samples for a target label)."""
    pool = left.objects + right.objects
    side = SIDES[int(rng.integers(2))]
    if kind == "count":
        return {"kind": kind, "side": side, "n": int(form), "desc": _propose_desc(rng, pool, shapes, colours)}
    if kind == "exist":
        return {"kind": kind, "side": side, "negated": bool(form), "desc": _propose_desc(rng, pool, shapes, colours)}
    if kind == "pair":
        return {"kind": kind, "quant": form, "desc": _propose_desc(rng, pool, shapes, colours)}
    if kind == "spatial":
        objs = (left if side == "left" else right).objects
        return {"kind": kind, "side": side, "rel": form,
                "a": _propose_desc(rng, objs, shapes, colours, 0.3),
                "b": _propose_desc(rng, objs, shapes, colours, 0.3)}
    if kind == "compare":
        return {"kind": kind, "cmp": form, "desc": _propose_desc(rng, pool, shapes, colours)}
    from vlkit.models.protocol import UnknownNameError

    raise UnknownNameError("statement type", kind, STATEMENT_KINDS)


# --------------------------------------------------------------------------- captions
def reading_order(scene: Scene) -> list[int]:
    return sorted(range(len(scene.objects)), key=lambda i: (scene.objects[i].row, scene.objects[i].col))


def caption_text(p: dict) -> str:
    k = p["kind"]
    if k in ("list", "scene"):
        items = [f"a {desc_text(d)}" for d in p["descs"]]
        body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return body + "."
    if k == "rel":
        return f"a {desc_text(p['a'])} {p['rel']} a {desc_text(p['b'])}."
    if k == "count":
        return f"exactly {NUMBERS[p['n']]} {desc_text(p['desc'], p['n'] != 1)}."
    raise ValueError(f"unknown caption kind {k!r}")


def caption_truth(p: dict, scene: Scene) -> bool:
    k = p["kind"]
    if k in ("list", "scene"):
        return all_distinct_match(p["descs"], scene)
    if k == "rel":
        return related(p["a"], p["rel"], p["b"], scene)
    if k == "count":
        return count(p["desc"], scene) == p["n"]
    raise ValueError(f"unknown caption kind {k!r}")


COUNT_KEEPS = (("colour", "shape"), ("shape",), ("colour",))


def propose_caption(kind: str, rng: np.random.Generator, scene: Scene, list_range: tuple[int, int] = (1, 3),
                    count_keeps: Sequence[tuple[str, ...]] = COUNT_KEEPS) -> dict:
    """A true caption of ``kind``: fully specified objects for list (``list_range`` objects,
    capped by the scene), rel and scene; a count over a description keeping one of
    ``count_keeps`` attribute sets of a random object."""
    objs, order = scene.objects, reading_order(scene)
    if kind == "scene":
        return {"kind": kind, "descs": [full_desc(objs[i]) for i in order]}
    if kind == "list":
        hi = min(list_range[1], len(objs))
        k = int(rng.integers(min(list_range[0], hi), hi + 1))
        chosen = set(rng.choice(len(objs), size=k, replace=False).tolist())
        return {"kind": kind, "descs": [full_desc(objs[i]) for i in order if i in chosen]}
    if kind == "rel":
        if len(objs) < 2:
            raise ValueError("a relation caption needs at least two objects")
        i, j = (int(v) for v in rng.choice(len(objs), size=2, replace=False))
        rels = [r for r in RELATIONS if holds(r, objs[i], objs[j])]
        return {"kind": kind, "a": full_desc(objs[i]), "rel": rels[int(rng.integers(len(rels)))],
                "b": full_desc(objs[j])}
    if kind == "count":
        o = objs[int(rng.integers(len(objs)))]
        keep = count_keeps[int(rng.integers(len(count_keeps)))]
        d = {a: (getattr(o, a) if a in keep else None) for a in ATTRIBUTES}
        return {"kind": kind, "desc": d, "n": count(d, scene)}
    from vlkit.models.protocol import UnknownNameError

    raise UnknownNameError("caption type", kind, CAPTION_KINDS)


def _slots(p: dict) -> list[tuple]:
    """Mutable slots of a caption program: (path to a description, attribute) or a scalar."""
    k = p["kind"]
    if k in ("list", "scene"):
        return [(("descs", i), a) for i, d in enumerate(p["descs"]) for a in ATTRIBUTES if d[a] is not None]
    if k == "rel":
        return [((s,), a) for s in ("a", "b") for a in ATTRIBUTES if p[s][a] is not None] + [((), "relation")]
    return [(("desc",), a) for a in ATTRIBUTES if p["desc"][a] is not None] + [((), "number")]


def mutate(p: dict, rng: np.random.Generator, shapes=SHAPES, colours=COLOURS) -> tuple[dict, str]:
    """Copy of ``p`` with exactly one slot changed to another valid value; returns
    ``(program, attribute)`` where attribute is size|colour|shape|relation|number."""
    q = {k: ([dict(d) for d in v] if k == "descs" else dict(v) if isinstance(v, dict) else v) for k, v in p.items()}
    slots = _slots(q)
    path, attr = slots[int(rng.integers(len(slots)))]
    if attr == "relation":
        others = [r for r in RELATIONS if r != q["rel"]]
        q["rel"] = others[int(rng.integers(len(others)))]
    elif attr == "number":
        options = [n for n in (q["n"] - 1, q["n"] + 1) if 1 <= n < len(NUMBERS)]
        q["n"] = options[int(rng.integers(len(options)))]
    else:
        d = q[path[0]] if len(path) == 1 else q[path[0]][path[1]]
        _swap_attribute(rng, d, [attr], shapes, colours)
    return q, attr


def hard_negative(p: dict, scene: Scene, rng: np.random.Generator, avoid: set[str] = frozenset(),
                  shapes=SHAPES, colours=COLOURS, tries: int = 50) -> tuple[dict, str] | None:
    """A one-slot mutation of caption ``p`` that is false for ``scene`` and whose text is
    not in ``avoid``; ``None`` if ``tries`` draws find none."""
    for _ in range(tries):
        q, attr = mutate(p, rng, shapes, colours)
        if not caption_truth(q, scene) and caption_text(q) not in avoid:
            return q, attr
    return None
