"""The shapes world: a procedural source of images, captions and interleaved documents.

A scene holds 1 to `max_shapes` shapes on a plain white background. Each shape has a kind
(circle, square, triangle), one of six clearly distinct colours, a size (small, large) and a cell
of a 3x3 grid (top left ... bottom right); one shape per cell, so shapes never overlap. Within a
scene no two shapes share both colour and kind, so "the red circle" always names one shape.

Rendering is aliased (every pixel is the background or one palette colour) and shapes are at least
~half a grid cell wide, so an analyser (`interleaf.data.analyse`) reads the ground truth back
exactly and a VQ tokenizer at 64x64 keeps every attribute visible. Captions use one small regular
grammar listing the shapes in reading order:

    "a large red circle at the top left and a small blue square in the center"

Everything is deterministic by (seed, index): `scene(i)`, `document(i)` and `text(i)` draw from
independent random streams, so the world is an unlimited, reproducible dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from interleaf.errors import InterleafError

KINDS = ("circle", "square", "triangle")
COLOURS = {  # RGB; pairwise distances >= ~90 so a lossy round trip keeps them apart
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 180),
    "orange": (250, 135, 20),
}
SIZES = ("small", "large")
SIZE_FRACTION = {"small": 0.5, "large": 0.84}  # shape extent as a fraction of a grid cell
GRID = 3
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # row-major: position index = row * 3 + column
BACKGROUND = (255, 255, 255)

# "at the top left", "on the left", "in the center": the preposition each position takes
_PREPOSITION = {p: "at" for p in POSITIONS} | {"left": "on", "right": "on", "center": "in"}

# independent random streams per kind of sample
_STREAM_SCENE, _STREAM_DOCUMENT, _STREAM_TEXT = 1, 2, 3


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: kind, colour, size and grid position (names from this module).

    The world always sets all four; a shape read back by `interleaf.data.analyse` leaves an
    attribute it could not tell as None.
    """

    kind: str | None
    colour: str | None
    size: str | None
    position: str | None

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the position on the 3x3 grid."""
        return divmod(POSITIONS.index(self.position), GRID)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        try:
            shape = cls(kind=d["kind"], colour=d["colour"], size=d["size"], position=d["position"])
        except (KeyError, TypeError) as e:
            raise InterleafError(f"malformed shape {d!r}: missing {e}") from None
        shape.check()
        return shape

    def check(self) -> None:
        """Raise InterleafError if any attribute is not a name of this world."""
        for value, allowed, what in (
            (self.kind, KINDS, "kind"),
            (self.colour, tuple(COLOURS), "colour"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise InterleafError(f"shape {what} {value!r} is not one of {', '.join(allowed)}")


@dataclass
class Scene:
    """The ground truth of one image: its shapes in reading order (by grid position)."""

    shapes: list[Shape] = field(default_factory=list)

    def __post_init__(self):
        self.shapes = sorted(self.shapes, key=lambda s: POSITIONS.index(s.position) if s.position in POSITIONS else 99)

    def to_dict(self) -> dict:
        return {"shapes": [s.to_dict() for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        if not isinstance(d, dict) or not isinstance(d.get("shapes"), list):
            raise InterleafError(f"malformed scene {d!r}: expected {{'shapes': [...]}}")
        return cls([Shape.from_dict(s) for s in d["shapes"]])

    def at(self, position: str) -> Shape | None:
        """The shape at a grid position, or None."""
        return next((s for s in self.shapes if s.position == position), None)

    def find(self, colour: str, kind: str) -> Shape | None:
        """The shape with this colour and kind, or None."""
        return next((s for s in self.shapes if s.colour == colour and s.kind == kind), None)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    if index < 0:
        raise InterleafError(f"sample index must be >= 0, got {index}")
    return np.random.default_rng([seed, stream, index])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def where(position: str) -> str:
    """'at the top left', 'on the left', 'in the center'."""
    return f"{_PREPOSITION[position]} the {position}"


def describe(shape: Shape) -> str:
    """'a large red circle at the top left'."""
    return f"a {shape.size} {shape.colour} {shape.kind} {where(shape.position)}"


def caption(scene: Scene) -> str:
    """The scene in the world's grammar: shapes in reading order joined by ', ' and ' and '."""
    parts = [describe(s) for s in scene.shapes]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


class ShapesWorld:
    """Deterministic, unlimited scenes, captions, interleaved and text-only documents."""

    def __init__(self, resolution: int = 64, max_shapes: int = 3, seed: int = 0, max_images: int = 4):
        if not 24 <= resolution <= 4096:
            raise InterleafError(f"shapes world resolution must be 24 to 4096 pixels, got {resolution}")
        if not 1 <= max_shapes <= GRID * GRID:
            raise InterleafError(f"max_shapes must be in 1..{GRID * GRID}, got {max_shapes}")
        if max_images < 1:
            raise InterleafError(f"max_images must be >= 1, got {max_images}")
        if seed < 0:
            raise InterleafError(f"shapes world seed must be >= 0, got {seed}")
        self.resolution = resolution
        self.max_shapes = max_shapes
        self.seed = seed
        self.max_images = max_images

    # ---- scenes -------------------------------------------------------------------------
    def scene(self, index: int) -> Scene:
        """Scene number `index`: 1..max_shapes shapes in distinct cells."""
        rng = _rng(self.seed, _STREAM_SCENE, index)
        return self._random_scene(rng, int(rng.integers(1, self.max_shapes + 1)))

    def _random_scene(self, rng: np.random.Generator, n: int) -> Scene:
        shapes: list[Shape] = []
        for _ in range(n):
            shapes.append(self._new_shape(rng, shapes))
        return Scene(shapes)

    def _new_shape(self, rng: np.random.Generator, others: list[Shape]) -> Shape:
        free = [p for p in POSITIONS if all(s.position != p for s in others)]
        taken = {(s.colour, s.kind) for s in others}
        pairs = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in taken]
        colour, kind = _pick(rng, pairs)
        return Shape(kind=kind, colour=colour, size=_pick(rng, SIZES), position=_pick(rng, free))

    def caption(self, scene: Scene) -> str:
        """Caption of a scene (see module `caption`)."""
        return caption(scene)

    def pair(self, index: int) -> tuple[Image.Image, str, Scene]:
        """(image, caption, scene) number `index`."""
        scene = self.scene(index)
        return self.render(scene), caption(scene), scene

    # ---- rendering -----------------------------------------------------------------------
    def shape_box(self, shape: Shape) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1) a shape is drawn in."""
        cell = self.resolution / GRID
        extent = max(3, round(SIZE_FRACTION[shape.size] * cell))
        row, col = shape.cell
        x0 = round((col + 0.5) * cell - extent / 2)
        y0 = round((row + 0.5) * cell - extent / 2)
        return x0, y0, x0 + extent - 1, y0 + extent - 1

    def render(self, scene: Scene) -> Image.Image:
        """Draw a scene: RGB, resolution x resolution, aliased (no blended pixels)."""
        image = Image.new("RGB", (self.resolution, self.resolution), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for shape in scene.shapes:
            shape.check()
            box = self.shape_box(shape)
            colour = COLOURS[shape.colour]
            if shape.kind == "circle":
                draw.ellipse(box, fill=colour)
            elif shape.kind == "square":
                draw.rectangle(box, fill=colour)
            else:  # triangle pointing up, base at the bottom of the box
                x0, y0, x1, y1 = box
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
        return image

    # ---- documents -----------------------------------------------------------------------
    def _story(self, rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
        """A first scene and 1..max_images-1 changes: scenes[i+1] = change i applied to scenes[i]."""
        n_images = int(rng.integers(2, self.max_images + 1)) if self.max_images > 1 else 1
        scenes = [self._random_scene(rng, int(rng.integers(1, self.max_shapes + 1)))]
        changes = []
        for _ in range(n_images - 1):
            scene, text = self._change(rng, scenes[-1])
            scenes.append(scene)
            changes.append(text)
        return scenes, changes

    def _change(self, rng: np.random.Generator, scene: Scene) -> tuple[Scene, str]:
        """One step of a story: move, appear, disappear, recolour or resize a shape."""
        shapes = list(scene.shapes)
        kinds = ["move", "recolour", "resize"]
        if len(shapes) < self.max_shapes:
            kinds.append("appear")
        if len(shapes) > 1:
            kinds.append("disappear")
        kind = _pick(rng, kinds)
        if kind == "appear":
            new = self._new_shape(rng, shapes)
            return Scene(shapes + [new]), f"then a {new.size} {new.colour} {new.kind} appears {where(new.position)}"
        i = int(rng.integers(len(shapes)))
        old = shapes[i]
        name = f"the {old.colour} {old.kind}"
        if kind == "disappear":
            return Scene(shapes[:i] + shapes[i + 1 :]), f"then {name} disappears"
        if kind == "move":
            free = [p for p in POSITIONS if all(s.position != p for s in shapes)]
            new = dataclasses.replace(old, position=_pick(rng, free))
            text = f"then {name} moves to the {new.position}"
        elif kind == "recolour":
            taken = {(s.colour, s.kind) for s in shapes}
            colours = [c for c in COLOURS if (c, old.kind) not in taken]
            new = dataclasses.replace(old, colour=_pick(rng, colours))
            text = f"then {name} turns {new.colour}"
        else:
            grow = old.size == "small"
            new = dataclasses.replace(old, size="large" if grow else "small")
            text = f"then {name} {'grows' if grow else 'shrinks'}"
        shapes[i] = new
        return Scene(shapes), text

    def _document_plan(self, index: int) -> list[str | Scene]:
        """Document `index` with each image still a Scene."""
        rng = _rng(self.seed, _STREAM_DOCUMENT, index)
        scenes, changes = self._story(rng)
        plan: list[str | Scene] = [_sentence(caption(scenes[0])), scenes[0]]
        for text, scene in zip(changes, scenes[1:]):
            plan += [_sentence(text), scene]
        if rng.random() < 0.5:
            plan.append(_sentence(f"finally we see {caption(scenes[-1])}"))
        return plan

    def document(self, index: int) -> tuple[list[str | Image.Image], list[Scene]]:
        """Interleaved document: caption, image, then each change followed by its image."""
        plan = self._document_plan(index)
        segments = [x if isinstance(x, str) else self.render(x) for x in plan]
        return segments, [x for x in plan if isinstance(x, Scene)]

    def story_step(self, index: int) -> tuple[list[str | Image.Image], Scene, Scene]:
        """Document `index` up to its first change, [caption, image, change], with the scene
        before the change and the scene it leads to (what the document shows next)."""
        plan = self._document_plan(index)
        if len(plan) < 4:
            raise ValueError("a story step needs a world whose documents hold two or more images (max_images >= 2)")
        return [plan[0], self.render(plan[1]), plan[2]], plan[1], plan[3]

    def document_texts(self, index: int) -> list[str]:
        """The text segments of `document(index)`, without rendering its images."""
        return [x for x in self._document_plan(index) if isinstance(x, str)]

    def texts(self, index: int) -> Iterator[str]:
        """Every text the world produces for `index`: caption, document texts, text document."""
        yield caption(self.scene(index))
        yield from self.document_texts(index)
        yield self.text(index)

    def text(self, index: int) -> str:
        """Text-only document: a story of changes, each followed by the scene it leads to."""
        rng = _rng(self.seed, _STREAM_TEXT, index)
        scenes, changes = self._story(rng)
        sentences = [_sentence(caption(scenes[0]))]
        for text, scene in zip(changes, scenes[1:]):
            sentences += [_sentence(text), _sentence(f"now we see {caption(scene)}")]
        return " ".join(sentences)
