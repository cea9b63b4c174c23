"""Scene generator, rendering and the statement / caption grammar (hand-worked and
property checks, plus an independent text-level oracle: shapes_oracle.py)."""

import collections

import numpy as np
import pytest
import shapes_oracle as oracle
from hypothesis import given, settings, strategies as st

from vlkit.data import grammar as g
from vlkit.data.scenes import (BACKGROUND, PALETTE, Obj, Scene, edit_scene, png_bytes, render, sample_scene)


def obj(shape, colour, size, row, col):
    return Obj(shape, colour, size, row, col, (col + 0.5) / 3, (row + 0.5) / 3)


# left:  . R .      right: G . .
#        B . r             . . .
#        . . R             . g .      (R/r large/small red circles, B large blue square,
LEFT = Scene((obj("circle", "red", "large", 0, 1), obj("square", "blue", "large", 1, 0),   # G/g green triangles)
              obj("circle", "red", "small", 1, 2), obj("circle", "red", "large", 2, 2)))
RIGHT = Scene((obj("triangle", "green", "large", 0, 0), obj("triangle", "green", "small", 2, 1)))


def D(size=None, colour=None, shape=None):
    return {"size": size, "colour": colour, "shape": shape}


@pytest.mark.parametrize("program, text, truth", [
    ({"kind": "count", "side": "left", "n": 3, "desc": D(colour="red", shape="circle")},
     "the left image contains exactly three red circles.", True),
    ({"kind": "count", "side": "left", "n": 2, "desc": D("large", "red", "circle")},
     "the left image contains exactly two large red circles.", True),
    ({"kind": "count", "side": "right", "n": 1, "desc": D(shape="triangle")},
     "the right image contains exactly one triangle.", False),
    ({"kind": "exist", "side": "right", "negated": True, "desc": D(colour="red")},
     "the right image contains no red shapes.", True),
    ({"kind": "exist", "side": "left", "negated": False, "desc": D("small", None, "square")},
     "the left image contains a small square.", False),
    ({"kind": "pair", "quant": "one", "desc": D(size="small")}, "exactly one image contains a small shape.", False),
    ({"kind": "pair", "quant": "both", "desc": D(size="small")}, "both images contain a small shape.", True),
    ({"kind": "pair", "quant": "neither", "desc": D(shape="star")}, "neither image contains a star.", True),
    ({"kind": "spatial", "side": "left", "rel": "to the left of", "a": D(colour="blue"), "b": D(size="small")},
     "in the left image, a blue shape is to the left of a small shape.", True),
    ({"kind": "spatial", "side": "left", "rel": "above", "a": D("small", "red", "circle"), "b": D(shape="square")},
     "in the left image, a small red circle is above a square.", False),  # same row
    ({"kind": "spatial", "side": "left", "rel": "below", "a": D(colour="red"), "b": D(colour="red")},
     "in the left image, a red shape is below a red shape.", True),  # two distinct red objects
    ({"kind": "spatial", "side": "right", "rel": "to the left of", "a": D(shape="triangle"), "b": D(shape="triangle")},
     "in the right image, a triangle is to the left of a triangle.", True),
    ({"kind": "compare", "cmp": "more", "desc": D(size="large")},
     "the left image contains more large shapes than the right image.", True),
    ({"kind": "compare", "cmp": "fewer", "desc": D(colour="green")},
     "the left image contains fewer green shapes than the right image.", True),
    ({"kind": "compare", "cmp": "same", "desc": D(shape="star")},
     "the left image contains the same number of stars as the right image.", True),
])
def test_statements_hand_worked(program, text, truth):
    assert g.statement_text(program) == text
    assert g.statement_truth(program, LEFT, RIGHT) is truth
    assert oracle.statement(text, LEFT.records(), RIGHT.records()) is truth


@pytest.mark.parametrize("program, truth", [
    ({"kind": "list", "descs": [D("large", "red", "circle"), D("large", "red", "circle")]}, True),
    ({"kind": "list", "descs": [D("small", "red", "circle"), D("small", "red", "circle")]}, False),  # only one
    ({"kind": "rel", "a": D("large", "blue", "square"), "rel": "above", "b": D("large", "red", "circle")}, True),
    ({"kind": "rel", "a": D("large", "blue", "square"), "rel": "below", "b": D("large", "red", "circle")}, True),
    ({"kind": "rel", "a": D("small", "red", "circle"), "rel": "to the right of", "b": D("large", "red", "circle")},
     True),
    ({"kind": "count", "n": 2, "desc": D(colour="red", shape="circle")}, False),
])
def test_captions_hand_worked(program, truth):
    assert g.caption_truth(program, LEFT) is truth
    assert oracle.caption(g.caption_text(program), LEFT.records()) is truth


def test_render_draws_palette_colours_in_cells_on_background():
    s = Scene((obj("square", "red", "large", 0, 0), obj("circle", "blue", "large", 2, 2)))
    a = np.asarray(render(s, 96))
    assert a.shape == (96, 96, 3)
    assert tuple(a[16, 16]) == PALETTE["red"] and tuple(a[80, 80]) == PALETTE["blue"]
    assert tuple(a[48, 48]) == BACKGROUND and tuple(a[16, 80]) == BACKGROUND
    assert png_bytes(render(s, 96)) == png_bytes(render(s, 96))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_jittered_shapes_stay_inside_their_cell(seed):
    """Every drawn pixel of an object lies inside its grid cell, so relations between cells
    are what the image shows."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, (1, 9), grid=3, distractors=3)
    size = 48
    for o in scene.objects:
        a = np.asarray(render(Scene((o,), 3), size)).astype(int)
        ys, xs = np.nonzero(np.abs(a - np.array(BACKGROUND)).sum(-1) > 0)
        assert len(ys) > 0
        cell = size // 3  # 16 px; pixel k covers [k, k + 1)
        assert o.row * cell <= ys.min() and ys.max() + 1 <= (o.row + 1) * cell, o
        assert o.col * cell <= xs.min() and xs.max() + 1 <= (o.col + 1) * cell, o


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lo=st.integers(2, 5), extra=st.integers(0, 3), d=st.integers(0, 3))
def test_sample_scene_counts_cells_and_distractors(seed, lo, extra, d):
    s = sample_scene(np.random.default_rng(seed), (lo, lo + extra), grid=3, distractors=d)
    objs = s.objects
    assert lo <= len(objs) <= lo + extra
    assert len({(o.row, o.col) for o in objs}) == len(objs)
    one_off = [i for i, o in enumerate(objs)
               if any(sum(a != b for a, b in zip(o.attrs(), p.attrs())) == 1 for p in objs if p is not o)]
    assert len(one_off) >= min(d, len(objs) - 1) + (1 if min(d, len(objs) - 1) else 0)  # copy and its source
    again = sample_scene(np.random.default_rng(seed), (lo, lo + extra), grid=3, distractors=d)
    assert again == s


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_edit_scene_makes_exactly_one_change(seed):
    rng = np.random.default_rng(seed)
    s = sample_scene(rng, (2, 6))
    t, what = edit_scene(s, rng, (2, 6))
    key = lambda o: (o.shape, o.colour, o.size, o.row, o.col)  # noqa: E731
    before, after = collections.Counter(map(key, s.objects)), collections.Counter(map(key, t.objects))
    removed, added = sum((before - after).values()), sum((after - before).values())
    verb = what.split()[0]
    assert (removed, added) == {"add": (0, 1), "remove": (1, 0)}.get(verb, (1, 1)), what
    assert 2 <= len(t.objects) <= 6 and len({(o.row, o.col) for o in t.objects}) == len(t.objects)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_hard_negative_is_false_and_changes_one_slot(seed):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, (2, 5))
    for kind in ("list", "rel", "count", "scene"):
        p = g.propose_caption(kind, rng, scene)
        assert g.caption_truth(p, scene) and oracle.caption(g.caption_text(p), scene.records())
        found = g.hard_negative(p, scene, rng)
        if found is None:  # possible (e.g. a count whose every change stays true), but rare
            continue
        q, attr = found
        assert not oracle.caption(g.caption_text(q), scene.records())
        (_, a), (_, b) = oracle.parse_caption(g.caption_text(p)), oracle.parse_caption(g.caption_text(q))
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1 and diff[0][0][0] == attr, (p, q)
