"""Read shapes-world scenes back from images and captions, and score them against the truth.

`analyse(image)` is deterministic image analysis, no learned parts:

    1. blobs: 4-connected pixels clearly different from the white background
    2. per blob, its colour: the palette colour whose mixes with white explain its pixels best
       (a blurred edge is such a mix); pixels far from every mix leave the colour unknown (noise)
    3. per blob, its outline: pixels at least halfway from white toward that colour; outlines are
       split into components again, so fringes from blur or JPEG ringing join no two shapes
    4. per outline: kind by the nearest reference shape rendered at the same resolution in
       (fill of its box, fill of its top corners, fill of its bottom corners, aspect ratio)
       (square ~ (1, 1, 1, 1), circle ~ (0.8, 0.3, 0.3, 1), triangle ~ (0.65, 0, 1, 1)), unknown
       when far from all; size by area against the small and large references of that kind;
       position from the centre of its box on the 3x3 grid. A blob wider than a grid cell is no
       shape of this world: it counts, with kind and size unknown.

Ground-truth renders read back exactly at every resolution the world allows (>= 24); at 64
pixels, JPEG at quality 20 or a 2x down-and-up resize still read back exactly for > 95% of scenes.

`parse_caption(text)` reads the world's caption grammar, best effort on partial text.
`score_scene(pred, truth)` matches predicted to true shapes (the assignment that agrees on most
attributes) and reports per-attribute accuracies over max(#pred, #truth) shapes, so missing and
extra shapes both cost.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from PIL import Image

from interleaf.data.shapes import BACKGROUND, COLOURS, GRID, KINDS, POSITIONS, SIZES, Scene, Shape, ShapesWorld

ATTRIBUTES = ("colour", "shape", "size", "position")
_BG = np.array(BACKGROUND, dtype=np.float32)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (C, 3)
_COLOUR_NAMES = list(COLOURS)
DETECT_DISTANCE = 60.0  # RGB distance from the background that starts a blob; the palette is >= 229 away
MIN_AREA_FRACTION = 0.3  # of the smallest reference shape's area
MAX_COLOUR_RESIDUAL = 70.0  # median RGB distance of a blob's pixels from its colour's mixes with white
MAX_EXTENT_CELLS = 1.15  # a blob wider than this many grid cells is not a shape of this world
MAX_KIND_DISTANCE = 0.6  # farther from every reference shape in feature space: kind unknown


# ---- image analysis ----------------------------------------------------------------------------


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, as index arrays into mask.ravel()."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)  # each pixel starts as itself
    while True:
        m = labels.copy()
        m[1:] = np.minimum(m[1:], labels[:-1])
        m[:-1] = np.minimum(m[:-1], labels[1:])
        m[:, 1:] = np.minimum(m[:, 1:], labels[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], labels[:, 1:])
        m = np.where(mask, m, big)
        flat = m.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # pointer jumping: follow the label's own label
        if np.array_equal(m, labels):
            break
        labels = m
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    roots, starts = np.unique(flat[order], return_index=True)
    groups = np.split(order, starts[1:])
    return [g for root, g in zip(roots, groups) if root < big]


def _features(blob: np.ndarray) -> np.ndarray:
    """(fill of the box, fill of its top corner patches, of its bottom ones, aspect ratio) of a bool mask."""
    h, w = blob.shape
    ch, cw = max(1, round(h / 4)), max(1, round(w / 4))
    top = (blob[:ch, :cw].mean() + blob[:ch, -cw:].mean()) / 2
    bottom = (blob[-ch:, :cw].mean() + blob[-ch:, -cw:].mean()) / 2
    return np.array([blob.mean(), top, bottom, min(h, w) / max(h, w)])


def _crop(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bool mask of these pixels, cropped to their bounding box."""
    blob = np.zeros((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1), dtype=bool)
    blob[ys - ys.min(), xs - xs.min()] = True
    return blob


@lru_cache(maxsize=16)
def _references(resolution: int) -> dict:
    """Features and areas of every kind and size, rendered at this resolution."""
    world = ShapesWorld(resolution=resolution)
    features, areas = {}, {}
    for kind in KINDS:
        for size in SIZES:
            x = np.asarray(world.render(Scene([Shape(kind, "red", size, "center")])))
            ys, xs = np.nonzero((x != BACKGROUND).any(-1))
            features[(kind, size)] = _features(_crop(ys, xs))
            areas[(kind, size)] = len(ys)
    return {"features": features, "areas": areas, "min_area": MIN_AREA_FRACTION * min(areas.values())}


def _classify_kind(features: np.ndarray, refs: dict) -> str | None:
    distances = {key: float(np.linalg.norm(features - ref)) for key, ref in refs["features"].items()}
    (kind, _), best = min(distances.items(), key=lambda kv: kv[1])
    return kind if best <= MAX_KIND_DISTANCE else None


def _classify_size(kind: str, area: int, refs: dict) -> str:
    """Nearer (in log area) to the small or the large reference of this kind."""
    small, large = refs["areas"][(kind, "small")], refs["areas"][(kind, "large")]
    return "large" if area >= np.sqrt(small * large) else "small"


def _blob_colour(pixels: np.ndarray) -> tuple[int, str | None]:
    """Palette colour whose mixes with the background explain the pixels (N, 3) best.

    A blurred edge pixel is a mix of background and shape colour, so each pixel is compared with
    the segment background -> colour, not with the colour itself. Pixels far from every such
    segment (noise, foreign colours) leave the colour unknown.
    """
    d = _PALETTE - _BG  # (C, 3)
    rel = pixels - _BG  # (N, 3)
    t = np.clip(rel @ d.T / (d * d).sum(-1), 0.0, 1.0)  # (N, C)
    residual = np.linalg.norm(rel[:, None, :] - t[:, :, None] * d[None], axis=-1)  # (N, C)
    cost = np.median(residual, axis=0)  # (C,)
    c = int(cost.argmin())
    return c, (_COLOUR_NAMES[c] if cost[c] <= MAX_COLOUR_RESIDUAL else None)


def _outline(pixels: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Which of a blob's pixels (N, 3) belong to its shape, and the shape's colour.

    alpha says how far a pixel lies from the background toward the blob's colour; the 50% cut
    keeps the outline of a blurred or compressed shape where it was drawn. A blob of unknown
    colour (noise) is kept whole.
    """
    c, colour = _blob_colour(pixels)
    if colour is None:
        return np.ones(len(pixels), dtype=bool), None
    direction = _PALETTE[c] - _BG
    alpha = (pixels - _BG) @ direction / (direction @ direction)
    return alpha >= 0.5, colour


def _blob_shape(idx: np.ndarray, colour: str | None, resolution: int, refs: dict) -> Shape:
    """The shape one blob (pixel indices into the flattened image) shows."""
    ys, xs = np.divmod(idx, resolution)
    blob = _crop(ys, xs)
    cell = resolution / GRID
    row = min(GRID - 1, int((ys.min() + ys.max() + 1) / 2 // cell))
    col = min(GRID - 1, int((xs.min() + xs.max() + 1) / 2 // cell))
    position = POSITIONS[row * GRID + col]
    if max(blob.shape) > MAX_EXTENT_CELLS * cell:
        return Shape(None, colour, None, position)
    kind = _classify_kind(_features(blob), refs)
    size = _classify_size(kind or "square", len(idx), refs)
    return Shape(kind, colour, size, position)


def analyse(image: Image.Image) -> Scene:
    """The scene an image shows (RGB, square; a non-square image is resized to its short side)."""
    image = image.convert("RGB")
    if image.size[0] != image.size[1]:
        side = min(image.size)
        image = image.resize((side, side), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32)  # (R, R, 3)
    resolution = x.shape[0]
    flat = x.reshape(-1, 3)
    refs = _references(resolution)
    # pass 1: blobs of anything clearly not background, each cut to its shape's outline
    detected = np.linalg.norm(x - _BG, axis=-1) > DETECT_DISTANCE
    outline = np.zeros(resolution * resolution, dtype=bool)
    for idx in _components(detected):
        if len(idx) >= refs["min_area"]:
            inside, _ = _outline(flat[idx])
            outline[idx[inside]] = True
    # pass 2: the outlines, which no longer touch through blurred or ringing fringes
    shapes = []
    for idx in _components(outline.reshape(resolution, resolution)):
        if len(idx) >= refs["min_area"]:
            _, colour = _blob_colour(flat[idx])
            shapes.append(_blob_shape(idx, colour, resolution, refs))
    return Scene(shapes)


# ---- captions ----------------------------------------------------------------------------------

_SYNONYMS = {
    "big": "large",
    "huge": "large",
    "tiny": "small",
    "little": "small",
    "centre": "center",
    "middle": "center",
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "upper": "top",
    "lower": "bottom",
    "violet": "purple",
}
_PREPOSITIONS = {"at", "on", "in", "to", "the", "of", "near"}


def _words(text: str) -> list[str]:
    return [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]


def _position_at(words: list[str], i: int) -> str | None:
    """A position phrase starting at words[i] ('top left', 'top', 'left', 'center', ...)."""
    if i >= len(words):
        return None
    first = words[i]
    second = words[i + 1] if i + 1 < len(words) else ""
    if first in ("top", "bottom"):
        return f"{first} {second}" if second in ("left", "right") else first
    if first in ("left", "right", "center"):
        return first
    return None


def parse_caption(text: str) -> Scene | None:
    """Shapes named in a caption of the world's grammar; None if it names no shape kind."""
    words = _words(text)
    shapes = []
    for k, word in enumerate(words):
        if word not in KINDS:
            continue
        size = colour = None
        j = k - 1
        while j >= 0 and (words[j] in SIZES or words[j] in COLOURS) and j >= k - 2:
            if words[j] in SIZES:
                size = size or words[j]
            else:
                colour = colour or words[j]
            j -= 1
        j = k + 1
        while j < len(words) and words[j] in _PREPOSITIONS:
            j += 1
        position = _position_at(words, j)
        shapes.append(Shape(word, colour, size, position))
    return Scene(shapes) if shapes else None


# ---- scoring -----------------------------------------------------------------------------------


def _agree(p: Shape, t: Shape) -> tuple[bool, bool, bool, bool]:
    return p.colour == t.colour, p.kind == t.kind, p.size == t.size, p.position == t.position


def _best_assignment(pred: list[Shape], truth: list[Shape]) -> list[tuple[int, int]]:
    """Pairs (pred index, truth index) agreeing on the most attributes (exact when small)."""
    gain = np.array([[sum(_agree(p, t)) for t in truth] for p in pred], dtype=np.int64).reshape(len(pred), len(truth))
    n = min(len(pred), len(truth))
    if n == 0:
        return []
    if len(pred) <= 7 and len(truth) <= 7:
        best, best_gain = [], -1
        if len(pred) >= len(truth):
            for perm in itertools.permutations(range(len(pred)), n):
                g = sum(gain[p, t] for t, p in enumerate(perm))
                if g > best_gain:
                    best, best_gain = [(p, t) for t, p in enumerate(perm)], g
        else:
            for perm in itertools.permutations(range(len(truth)), n):
                g = sum(gain[p, t] for p, t in enumerate(perm))
                if g > best_gain:
                    best, best_gain = list(enumerate(perm)), g
        return best
    pairs, used_p, used_t = [], set(), set()  # greedy for large predictions (noise)
    for flat in np.argsort(-gain, axis=None, kind="stable"):
        p, t = divmod(int(flat), len(truth))
        if p not in used_p and t not in used_t:
            pairs.append((p, t))
            used_p.add(p)
            used_t.add(t)
    return pairs


def score_scene(pred: Scene | None, truth: Scene) -> dict[str, float]:
    """Per-attribute accuracies (colour, shape, size, position), count and exact match, in [0, 1]."""
    if pred is None:
        return {a: 0.0 for a in ATTRIBUTES} | {"count": 0.0, "exact": 0.0}
    p_shapes, t_shapes = list(pred.shapes), list(truth.shapes)
    denominator = max(len(p_shapes), len(t_shapes), 1)
    totals = np.zeros(len(ATTRIBUTES))
    for p, t in _best_assignment(p_shapes, t_shapes):
        totals += np.array(_agree(p_shapes[p], t_shapes[t]), dtype=np.float64)
    scores = {a: float(v) / denominator for a, v in zip(ATTRIBUTES, totals)}
    scores["count"] = float(len(p_shapes) == len(t_shapes))

    def key(s):
        return (s.position or "", s.kind or "", s.colour or "", s.size or "")

    scores["exact"] = float(sorted(p_shapes, key=key) == sorted(t_shapes, key=key))
    return scores


def mean_scores(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """Average a list of `score_scene` results key by key."""
    scores = list(scores)
    if not scores:
        return {}
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def score_image(image: Image.Image, truth: Scene) -> dict[str, float]:
    """score_scene(analyse(image), truth)."""
    return score_scene(analyse(image), truth)


def score_caption(text: str, truth: Scene) -> dict[str, float]:
    """score_scene(parse_caption(text), truth)."""
    return score_scene(parse_caption(text), truth)
