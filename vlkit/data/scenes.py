"""Seeded scenes of coloured shapes and their rendering (PIL).

A :class:`Scene` is a handful of objects on a ``grid x grid`` layout; each object has a
shape, a colour, a size and a grid cell (one object per cell), plus a small seeded jitter
of its centre inside the cell. The cell is the ground truth for spatial relations
(:mod:`vlkit.data.grammar`): object ``a`` is *left of* ``b`` iff ``a.col < b.col`` and
*above* ``b`` iff ``a.row < b.row`` (CLEVR-style relations on object positions, Johnson et
al., CVPR 2017, here on a grid so that every relation is visually unambiguous: the jitter
never moves a shape out of its cell).

Difficulty comes from ``n_objects`` (range per image) and ``distractors``: a distractor
is a copy of another object of the same scene with exactly one attribute changed (a red
circle next to a blue circle), so a model has to bind attributes to objects instead of
reading a bag of attributes.

Rendering draws at ``SUPERSAMPLE`` x the target size and downsamples with a box filter
(anti-aliased edges); it is a pure function of the scene and the size, so the same scene
always gives the same pixels and the same PNG bytes.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Colour names never start with a vowel, so the article is always "a".
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 84, 220),
    "yellow": (235, 200, 25),
    "purple": (140, 60, 190),
    "cyan": (30, 190, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SIZES: tuple[str, ...] = ("small", "large")
ATTRIBUTES: tuple[str, ...] = ("size", "colour", "shape")
BACKGROUND = (250, 250, 250)
SUPERSAMPLE = 4
# Radius of a shape as a fraction of the cell side; the jitter keeps a MARGIN to the border.
RADIUS = {"small": 0.24, "large": 0.40}
MARGIN = 0.04


@dataclass(frozen=True)
class Obj:
    """One object: attributes, grid cell and centre ``(x, y)`` in [0, 1] image units."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float
    y: float

    def attrs(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    grid: int = 3

    def records(self) -> list[dict]:
        """Plain dicts (the dataset's ``scene`` metadata column)."""
        return [asdict(o) for o in self.objects]

    @classmethod
    def from_records(cls, records, grid: int = 3) -> "Scene":
        return cls(tuple(Obj(**r) for r in records), grid)


def check_vocabulary(shapes, colours) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Validate shape / colour subsets (at least two of each, so one can be swapped)."""
    from vlkit.models.protocol import UnknownNameError

    shapes, colours = tuple(shapes), tuple(colours)
    for kind, values, valid in (("shape", shapes, SHAPES), ("colour", colours, COLOURS)):
        for v in values:
            if v not in valid:
                raise UnknownNameError(kind, v, valid)
        if len(set(values)) < 2:
            raise ValueError(f"need at least two distinct {kind}s, got {values!r}")
    return shapes, colours


def sample_scene(
    rng: np.random.Generator,
    n_objects: tuple[int, int] = (3, 6),
    grid: int = 3,
    distractors: int = 1,
    shapes=SHAPES,
    colours=COLOURS,
) -> Scene:
    """Draw a scene: ``n`` objects (uniform in the inclusive ``n_objects`` range), each in
    its own random cell. The first ``n - d`` objects get independent uniform attributes;
    the last ``d = min(distractors, n - 1)`` each copy an earlier object and change one
    attribute (uniformly chosen) to another value."""
    lo, hi = n_objects
    n = int(rng.integers(lo, hi + 1))
    n_d = min(int(distractors), n - 1)
    attrs: list[list[str]] = []
    for _ in range(n - n_d):
        attrs.append([SIZES[rng.integers(len(SIZES))], colours[rng.integers(len(colours))],
                      shapes[rng.integers(len(shapes))]])
    vocab = (SIZES, colours, shapes)
    for _ in range(n_d):
        new = list(attrs[int(rng.integers(len(attrs)))])
        k = int(rng.integers(3))
        others = [v for v in vocab[k] if v != new[k]]
        new[k] = others[int(rng.integers(len(others)))]
        attrs.append(new)
    cells = rng.permutation(grid * grid)[:n]
    objs = []
    for (size, colour, shape), cell in zip(attrs, cells):
        row, col = divmod(int(cell), grid)
        objs.append(Obj(shape, colour, size, row, col, *_place(rng, size, row, col, grid)))
    return Scene(tuple(objs), grid)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n, radius, phase=-math.pi / 2):
        return [(cx + radius[i % len(radius)] * math.cos(phase + 2 * math.pi * i / n),
                 cy + radius[i % len(radius)] * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, apex up; centroid shifted down so it fills the cell
        return [(x, y + 0.15 * r) for x, y in ring(3, [1.1 * r])]
    if shape == "diamond":
        return ring(4, [r])
    if shape == "star":
        return ring(10, [r, 0.45 * r])
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size x size`` RGB image (anti-aliased by supersampling)."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / scene.grid
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, RADIUS[o.size] * cell
        fill = PALETTE[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no timestamps or text chunks)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


EDITS = ("colour", "shape", "size", "move", "remove", "add")


def _place(rng, size: str, row: int, col: int, grid: int) -> tuple[float, float]:
    """Centre of a shape in cell (row, col), jittered by at most what keeps it in the cell."""
    jit = (0.5 - RADIUS[size] - MARGIN) / grid
    dx, dy = rng.uniform(-jit, jit, size=2)
    return round((col + 0.5) / grid + float(dx), 5), round((row + 0.5) / grid + float(dy), 5)


def edit_scene(scene: Scene, rng: np.random.Generator, n_objects: tuple[int, int] = (1, 9),
               shapes=SHAPES, colours=COLOURS) -> tuple[Scene, str]:
    """One minimal edit of ``scene`` (for contrastive pairs, as in NLVR2's minimally
    different image pairs): change one object's colour, shape or size, move it to an empty
    cell, remove it, or add a random object in an empty cell -- keeping the object count
    within ``n_objects``. Returns the new scene and a short description of the edit."""
    objs, grid = list(scene.objects), scene.grid
    free = sorted(set(range(grid * grid)) - {o.row * grid + o.col for o in objs})
    edits = [e for e in EDITS if not ((e == "remove" and len(objs) <= max(1, n_objects[0]))
                                      or (e in ("add", "move") and not free)
                                      or (e == "add" and len(objs) >= n_objects[1]))]
    e = edits[int(rng.integers(len(edits)))]
    if e == "add":
        row, col = divmod(int(free[int(rng.integers(len(free)))]), grid)
        size = SIZES[int(rng.integers(len(SIZES)))]
        new = Obj(shapes[int(rng.integers(len(shapes)))], colours[int(rng.integers(len(colours)))], size, row, col,
                  *_place(rng, size, row, col, grid))
        return Scene(tuple(objs) + (new,), grid), f"add {new.size} {new.colour} {new.shape}"
    i = int(rng.integers(len(objs)))
    o = objs[i]
    if e == "remove":
        return Scene(tuple(objs[:i] + objs[i + 1:]), grid), f"remove {o.size} {o.colour} {o.shape}"
    if e == "move":
        row, col = divmod(int(free[int(rng.integers(len(free)))]), grid)
        objs[i] = Obj(o.shape, o.colour, o.size, row, col, *_place(rng, o.size, row, col, grid))
        return Scene(tuple(objs), grid), f"move {o.size} {o.colour} {o.shape} to ({row}, {col})"
    vocab = {"colour": colours, "shape": shapes, "size": SIZES}[e]
    old = getattr(o, e)
    others = [v for v in vocab if v != old]
    new_value = others[int(rng.integers(len(others)))]
    fields = {"colour": o.colour, "shape": o.shape, "size": o.size, e: new_value}
    if e == "size":  # keep the shape inside its cell at the new radius
        x, y = _place(rng, new_value, o.row, o.col, grid)
    else:
        x, y = o.x, o.y
    objs[i] = Obj(fields["shape"], fields["colour"], fields["size"], o.row, o.col, x, y)
    return Scene(tuple(objs), grid), f"{e} of {o.size} {o.colour} {o.shape} -> {new_value}"
