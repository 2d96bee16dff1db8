import numpy as np
import pytest
from PIL import Image

from interleaf.data.shapes import BACKGROUND, COLOURS, KINDS, POSITIONS, SIZES, Scene, Shape, ShapesWorld, caption
from interleaf.errors import InterleafError


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int64)


def test_deterministic_by_seed_and_index():
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in (0, 1, 57, 10_000_000):
        assert a.scene(i) == b.scene(i)
        assert np.array_equal(pixels(a.pair(i)[0]), pixels(b.pair(i)[0]))
        assert a.text(i) == b.text(i)
        da, db = a.document(i)[0], b.document(i)[0]
        assert [x if isinstance(x, str) else pixels(x).tobytes() for x in da] == [
            x if isinstance(x, str) else pixels(x).tobytes() for x in db
        ]
    other = ShapesWorld(seed=4)
    assert sum(a.scene(i) != other.scene(i) for i in range(20)) >= 15
    assert len({caption(a.scene(i)) for i in range(50)}) >= 45


def test_scenes_follow_the_rules():
    world = ShapesWorld(max_shapes=3)
    counts = set()
    for i in range(300):
        scene = world.scene(i)
        counts.add(len(scene.shapes))
        positions = [s.position for s in scene.shapes]
        assert len(set(positions)) == len(positions)  # one shape per cell
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        assert positions == sorted(positions, key=POSITIONS.index)  # reading order
        assert Scene.from_dict(scene.to_dict()) == scene
    assert counts == {1, 2, 3}


def test_render_is_aliased_and_matches_scene():
    world = ShapesWorld(resolution=64)
    palette = {BACKGROUND, *COLOURS.values()}
    for i in range(30):
        image, _, scene = world.pair(i)
        assert image.mode == "RGB" and image.size == (64, 64)
        x = pixels(image)
        colours = {tuple(c) for c in x.reshape(-1, 3)}
        assert colours <= palette
        for shape in scene.shapes:
            x0, y0, x1, y1 = world.shape_box(shape)
            inside = x[y0 : y1 + 1, x0 : x1 + 1]
            mask = (inside == COLOURS[shape.colour]).all(-1)
            fill = mask.mean()
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape.kind]
            assert abs(fill - expected) < 0.12, (shape, fill)
            # the box is tight: the shape touches all four sides
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        n_fg = (x != BACKGROUND).any(-1).sum()
        n_boxes = sum(
            ((pixels(image)[b[1] : b[3] + 1, b[0] : b[2] + 1] != BACKGROUND).any(-1)).sum()
            for b in map(world.shape_box, scene.shapes)
        )
        assert n_fg == n_boxes  # nothing drawn outside the boxes


def test_large_is_larger_and_boxes_stay_in_cells():
    world = ShapesWorld(resolution=64)
    cell = 64 / 3
    for pos in POSITIONS:
        small = world.shape_box(Shape("square", "red", "small", pos))
        large = world.shape_box(Shape("square", "red", "large", pos))
        assert large[2] - large[0] >= 1.5 * (small[2] - small[0])
        row, col = divmod(POSITIONS.index(pos), 3)
        assert col * cell <= large[0] and large[2] < (col + 1) * cell
        assert row * cell <= large[1] and large[3] < (row + 1) * cell


def test_caption_matches_scene():
    scene = Scene([Shape("square", "blue", "small", "center"), Shape("circle", "red", "large", "top left")])
    assert caption(scene) == "a large red circle at the top left and a small blue square in the center"
    three = Scene(scene.shapes + [Shape("triangle", "green", "small", "right")])
    assert caption(three) == (
        "a large red circle at the top left, a small blue square in the center and a small green triangle on the right"
    )
    world = ShapesWorld()
    for i in range(50):
        _, text, scene = world.pair(i)
        for shape in scene.shapes:
            assert f"{shape.size} {shape.colour} {shape.kind}" in text
        assert text.count(" and ") == (len(scene.shapes) > 1)


def test_documents_change_step_by_step():
    world = ShapesWorld(max_images=4)
    n_images = set()
    for i in range(40):
        segments, scenes = world.document(i)
        images = [s for s in segments if isinstance(s, Image.Image)]
        n_images.add(len(images))
        assert len(images) == len(scenes) >= 2
        assert (
            isinstance(segments[0], str) and segments[0] == caption(scenes[0])[0].upper() + caption(scenes[0])[1:] + "."
        )
        for image, scene in zip(images, scenes):
            assert np.array_equal(pixels(image), pixels(world.render(scene)))
        # text before each later image is the change from the previous scene
        texts = [segments[j - 1] for j, s in enumerate(segments) if isinstance(s, Image.Image)][1:]
        for before, after, text in zip(scenes, scenes[1:], texts):
            assert text.startswith("Then ") and before != after
            check_change(before, after, text)
    assert n_images == {2, 3, 4}


def check_change(before: Scene, after: Scene, text: str) -> None:
    words = text.rstrip(".").split()
    if "appears" in words:
        assert len(after.shapes) == len(before.shapes) + 1
        size, colour, kind = words[2:5]
        new = after.find(colour, kind)
        assert new is not None and new.size == size and text.endswith(new.position + ".")
        return
    colour, kind = words[2], words[3]
    old = before.find(colour, kind)
    assert old is not None
    verb = words[4]
    if verb == "disappears":
        assert after.find(colour, kind) is None and len(after.shapes) == len(before.shapes) - 1
    elif verb == "moves":
        assert after.find(colour, kind).position == " ".join(words[7:])
    elif verb == "turns":
        assert after.find(colour, kind) is None and after.find(words[5], kind) is not None
    elif verb in ("grows", "shrinks"):
        assert after.find(colour, kind).size == ("large" if verb == "grows" else "small")
    else:
        raise AssertionError(text)


def test_text_documents_tell_a_story():
    world = ShapesWorld()
    for i in range(20):
        text = world.text(i)
        assert text.endswith(".") and "Then " in text and "Now we see " in text
        words = set(text.lower().replace(",", " ").replace(".", " ").split())
        assert words & set(KINDS) and words & set(COLOURS) and words & set(SIZES)


def test_bad_input():
    with pytest.raises(InterleafError):
        ShapesWorld(resolution=8)
    with pytest.raises(InterleafError):
        ShapesWorld(max_shapes=0)
    with pytest.raises(InterleafError):
        ShapesWorld(seed=-1)
    with pytest.raises(InterleafError):
        ShapesWorld().scene(-1)
    with pytest.raises(InterleafError):
        Scene.from_dict({"shapes": [{"kind": "hexagon", "colour": "red", "size": "small", "position": "top"}]})
    with pytest.raises(InterleafError):
        Scene.from_dict({"shapes": [{"kind": "circle"}]})


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_resolutions(resolution):
    image, _, _ = ShapesWorld(resolution=resolution).pair(0)
    assert image.size == (resolution, resolution)


def test_document_texts_match_documents():
    world = ShapesWorld()
    for i in range(10):
        segments, _ = world.document(i)
        assert world.document_texts(i) == [s for s in segments if isinstance(s, str)]
        texts = list(world.texts(i))
        assert texts[0] == world.pair(i)[1] and texts[-1] == world.text(i)
