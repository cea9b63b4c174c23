"""An independent reading of the generated sentences, for the tests.

It parses the *text* of statements and captions with regular expressions (not the
programs the generator stored) and evaluates them on the scene metadata rows, using the
object centres ``x, y`` for spatial relations (not the grid cells the generator uses): an
object is left of another when its centre is more than half a cell further left. So a
label agrees only if the text, the rendering positions and the generator's semantics all
agree. Nothing here imports vlkit.data.grammar.
"""

from __future__ import annotations

import re

SIZES = {"small", "large"}
COLOURS = {"red", "green", "blue", "yellow", "purple", "cyan"}
SHAPES = {"circle", "square", "triangle", "diamond", "star"}
NUM = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
REL = "to the left of|to the right of|above|below"


def desc(words: str) -> dict:
    toks = words.split()
    noun = toks[-1]
    noun = noun[:-1] if noun.endswith("s") else noun
    d = {"size": None, "colour": None, "shape": None if noun == "shape" else noun}
    assert noun == "shape" or noun in SHAPES, words
    for t in toks[:-1]:
        key = "size" if t in SIZES else "colour" if t in COLOURS else None
        assert key and d[key] is None, f"unexpected word {t!r} in {words!r}"
        d[key] = t
    return d


def match(d: dict, o: dict) -> bool:
    return all(v is None or o[k] == v for k, v in d.items())


def n_match(d: dict, scene: list[dict]) -> int:
    return len([o for o in scene if match(d, o)])


def rel_holds(rel: str, a: dict, b: dict, half_cell: float) -> bool:
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]  # image y grows downwards
    return {"to the left of": dx > half_cell, "to the right of": -dx > half_cell,
            "above": dy > half_cell, "below": -dy > half_cell}[rel]


def exists_rel(a: dict, rel: str, b: dict, scene: list[dict], half_cell: float) -> bool:
    return any(x is not y and match(a, x) and match(b, y) and rel_holds(rel, x, y, half_cell)
               for x in scene for y in scene)


def distinct_match(descs: list[dict], scene: list[dict]) -> bool:
    """Backtracking search for distinct objects matching every description."""
    def search(i: int, used: frozenset) -> bool:
        return i == len(descs) or any(
            j not in used and match(descs[i], o) and search(i + 1, used | {j}) for j, o in enumerate(scene))
    return search(0, frozenset())


def statement(text: str, left: list[dict], right: list[dict], grid: int = 3) -> bool:
    h = 0.5 / grid
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"the (left|right) image contains exactly (\w+) (.+)\.", text):
        return n_match(desc(m[3]), side[m[1]]) == NUM[m[2]]
    if m := re.fullmatch(r"the (left|right) image contains no (.+)\.", text):
        return n_match(desc(m[2]), side[m[1]]) == 0
    if m := re.fullmatch(r"the left image contains the same number of (.+) as the right image\.", text):
        return n_match(desc(m[1]), left) == n_match(desc(m[1]), right)
    if m := re.fullmatch(r"the left image contains (more|fewer) (.+) than the right image\.", text):
        a, b = n_match(desc(m[2]), left), n_match(desc(m[2]), right)
        return a > b if m[1] == "more" else a < b
    if m := re.fullmatch(r"the (left|right) image contains a (.+)\.", text):
        return n_match(desc(m[2]), side[m[1]]) > 0
    if m := re.fullmatch(r"(both images contain|exactly one image contains|neither image contains) a (.+)\.", text):
        hits = sum(n_match(desc(m[2]), s) > 0 for s in (left, right))
        return hits == {"both images contain": 2, "exactly one image contains": 1, "neither image contains": 0}[m[1]]
    if m := re.fullmatch(rf"in the (left|right) image, a (.+?) is ({REL}) a (.+)\.", text):
        return exists_rel(desc(m[2]), m[3], desc(m[4]), side[m[1]], h)
    raise AssertionError(f"unparsed statement {text!r}")


def parse_caption(text: str) -> tuple[str, list]:
    """(kind, slots): slots is a flat list of (slot name, value) pairs, in order."""
    if m := re.fullmatch(r"exactly (\w+) (.+)\.", text):
        d = desc(m[2])
        return "count", [("number", NUM[m[1]])] + [(k, v) for k, v in d.items()]
    if m := re.fullmatch(rf"a (.+?) ({REL}) a (.+)\.", text):
        a, b = desc(m[1]), desc(m[3])
        return "rel", [(k, v) for k, v in a.items()] + [("relation", m[2])] + [(k, v) for k, v in b.items()]
    m = re.fullmatch(r"(a .+)\.", text)
    assert m, text
    items = re.split(r", | and ", m[1])
    assert all(i.startswith("a ") for i in items), text
    return "list", [(k, v) for i in items for k, v in desc(i[2:]).items()]


def caption(text: str, scene: list[dict], grid: int = 3) -> bool:
    h = 0.5 / grid
    if m := re.fullmatch(r"exactly (\w+) (.+)\.", text):
        return n_match(desc(m[2]), scene) == NUM[m[1]]
    if m := re.fullmatch(rf"a (.+?) ({REL}) a (.+)\.", text):
        return exists_rel(desc(m[1]), m[2], desc(m[3]), scene, h)
    items = re.split(r", | and ", text[:-1])
    return distinct_match([desc(i[2:]) for i in items], scene)
