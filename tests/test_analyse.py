import dataclasses
import io
import types

import numpy as np
import pytest
from PIL import Image, ImageFilter

from interleaf.data.analyse import analyse, mean_scores, parse_caption, score_caption, score_image, score_scene
from interleaf.data.shapes import COLOURS, KINDS, POSITIONS, Scene, Shape, ShapesWorld, caption

WORLD = ShapesWorld(resolution=64)
SCENES = [WORLD.scene(i) for i in range(200)]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def mean_over(make_image, scenes=SCENES, truths=None) -> dict:
    truths = truths or scenes
    return mean_scores(score_image(make_image(s), t) for s, t in zip(scenes, truths))


def test_ground_truth_renders_score_perfectly():
    for scene in SCENES:
        pred = analyse(WORLD.render(scene))
        assert pred == scene, (scene, pred)
        assert score_scene(pred, scene) == {
            "colour": 1.0,
            "shape": 1.0,
            "size": 1.0,
            "position": 1.0,
            "count": 1.0,
            "exact": 1.0,
        }


@pytest.mark.parametrize("resolution", [48, 128])
def test_other_resolutions(resolution):
    world = ShapesWorld(resolution=resolution, seed=1)
    for i in range(25):
        image, _, scene = world.pair(i)
        assert analyse(image) == scene


def test_lossy_round_trips_still_read():
    scores = mean_over(lambda s: jpeg(WORLD.render(s), 20), SCENES[:60])
    assert scores["exact"] >= 0.95 and min(scores[a] for a in ("colour", "shape", "size", "position")) >= 0.98

    def blur(s):
        return WORLD.render(s).resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BICUBIC)

    assert mean_over(blur, SCENES[:60])["exact"] >= 0.95

    def gauss(s):
        return WORLD.render(s).filter(ImageFilter.GaussianBlur(1))

    assert mean_over(gauss, SCENES[:60])["exact"] >= 0.95
    rng = np.random.default_rng(0)

    def noisy(s):
        return Image.fromarray(
            np.clip(np.asarray(WORLD.render(s)) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        )

    assert mean_over(noisy, SCENES[:60])["exact"] >= 0.95


def test_noise_and_blank_images_fail():
    rng = np.random.default_rng(0)

    def noise(s):
        return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))

    scores = mean_over(noise, SCENES[:40])
    assert scores["exact"] == 0 and scores["colour"] < 0.1 and scores["shape"] < 0.1

    def blocky(s):
        return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.NEAREST)

    scores = mean_over(blocky, SCENES[:40])
    assert scores["exact"] == 0 and scores["colour"] < 0.25 and scores["shape"] < 0.25
    for colour in [(255, 255, 255), (0, 0, 0), (128, 128, 128), COLOURS["red"]]:
        scores = mean_over(lambda s, colour=colour: Image.new("RGB", (64, 64), colour), SCENES[:30])
        assert scores["exact"] == 0 and scores["shape"] == 0 and scores["size"] == 0
        # a flood of red is one (shapeless) red blob: it gets the colour of red scenes, no more
        assert scores["colour"] < 0.3 and scores["position"] < 0.2


def alter(scene: Scene, **changes) -> Scene:
    return Scene([dataclasses.replace(s, **{k: f(s) for k, f in changes.items()}) for s in scene.shapes])


def test_wrong_attributes_are_caught():
    colours, kinds = list(COLOURS), list(KINDS)
    cases = {
        "colour": dict(colour=lambda s: colours[(colours.index(s.colour) + 1) % len(colours)]),
        "shape": dict(kind=lambda s: kinds[(kinds.index(s.kind) + 1) % len(kinds)]),
        "size": dict(size=lambda s: "small" if s.size == "large" else "large"),
    }
    for attribute, change in cases.items():
        wrong = [alter(s, **change) for s in SCENES[:60]]
        scores = mean_over(WORLD.render, wrong, SCENES[:60])
        assert scores[attribute] == 0 and scores["exact"] == 0, attribute
        assert all(scores[a] == 1 for a in ("colour", "shape", "size", "position", "count") if a != attribute)
    # every shape moved one cell along its row
    truths = [scene for scene in SCENES[:60] if len(scene.shapes) == 1]

    def along_row(p):
        return POSITIONS[POSITIONS.index(p) // 3 * 3 + (POSITIONS.index(p) + 1) % 3]

    moved = [alter(scene, position=lambda s: along_row(s.position)) for scene in truths]
    assert mean_over(WORLD.render, moved, truths)["position"] == 0


def test_other_scenes_score_low():
    other = ShapesWorld(resolution=64, seed=99)
    scores = mean_scores(score_image(other.render(other.scene(i)), SCENES[i]) for i in range(100))
    assert scores["exact"] < 0.05 and scores["position"] < 0.4 and scores["colour"] < 0.4


def test_score_counts_missing_and_extra_shapes():
    a = Shape("circle", "red", "large", "top left")
    b = Shape("square", "blue", "small", "center")
    c = Shape("triangle", "green", "small", "bottom")
    truth = Scene([a, b])
    assert score_scene(Scene([a]), truth) == {
        "colour": 0.5,
        "shape": 0.5,
        "size": 0.5,
        "position": 0.5,
        "count": 0.0,
        "exact": 0.0,
    }
    extra = score_scene(Scene([a, b, c]), truth)
    assert extra["colour"] == pytest.approx(2 / 3) and extra["count"] == 0 and extra["exact"] == 0
    assert score_scene(Scene([b, a]), truth)["exact"] == 1.0  # order does not matter
    assert score_scene(None, truth)["colour"] == 0 and score_scene(Scene([]), truth)["count"] == 0
    assert score_scene(Scene([]), Scene([]))["exact"] == 1.0
    many = Scene([dataclasses.replace(a, position=p) for p in POSITIONS])  # greedy path
    assert score_scene(many, truth)["colour"] == pytest.approx(1 / 9)


def test_caption_round_trip():
    for scene in SCENES:
        assert parse_caption(caption(scene)) == scene
        assert score_caption(caption(scene), scene)["exact"] == 1.0
    for i in range(30):  # sentences of documents parse too
        segments, scenes = WORLD.document(i)
        assert parse_caption(segments[0]) == scenes[0]


def test_caption_parser_best_effort():
    assert parse_caption("") is None
    assert parse_caption("large blue and red") is None
    assert parse_caption("A BIG red Circle in the middle.") == Scene([Shape("circle", "red", "large", "center")])
    assert parse_caption("a red circle") == Scene([Shape("circle", "red", None, None)])
    partial = parse_caption("a small green triangle at the top right and a large")
    assert partial == Scene([Shape("triangle", "green", "small", "top right")])
    garbled = parse_caption("a small purple square on the the left, a blue blue circle at bottom")
    assert garbled == Scene([Shape("square", "purple", "small", "left"), Shape("circle", "blue", None, "bottom")])
    truth = Scene([Shape("circle", "red", "large", "center")])
    scores = score_caption("a red circle", truth)
    assert scores["colour"] == 1 and scores["shape"] == 1 and scores["size"] == 0 and scores["exact"] == 0
    assert score_caption("nothing useful here", truth)["colour"] == 0


class PixelCodec:
    """A stand-in VQ-GAN whose 'codes' are the pixels: decode(encode(x)) == transform(x)."""

    def __init__(self, transform=lambda x: x):
        self.transform = transform
        self.config = types.SimpleNamespace(resolution=64, n_embed=256)
        self.device = "cpu"

    def encode(self, x):
        return ((x + 1) * 127.5).round().long()

    def decode_code(self, codes):
        return self.transform(codes.float() / 127.5 - 1)


def test_eval_reports_what_the_vqgan_round_trip_reads_back():
    """The round-trip row is the text->image ceiling: 100 % for a lossless codec, not for one that loses colour."""
    from interleaf.evaluate import EvalConfig, eval_vqgan, format_report

    cfg = EvalConfig(n_draw=4, n_caption=4)
    lossless = eval_vqgan(types.SimpleNamespace(vqgan=PixelCodec()), cfg, n=16)
    assert lossless["roundtrip"] == {
        "colour": 1.0,
        "shape": 1.0,
        "size": 1.0,
        "position": 1.0,
        "count": 1.0,
        "exact": 1.0,
    }
    assert lossless["psnr"] > 60
    swapped = eval_vqgan(types.SimpleNamespace(vqgan=PixelCodec(lambda x: x[:, [1, 0, 2]])), cfg, n=16)
    assert swapped["roundtrip"]["colour"] < 0.6 and swapped["roundtrip"]["position"] == 1.0
    table = format_report({"vqgan": swapped})
    assert "vq-gan round trip" in table and f"{100 * swapped['roundtrip']['colour']:5.1f}%" in table


def test_story_steps_score_the_scene_after_the_change(monkeypatch):
    """A model that draws the next scene scores 100 %; one that redraws the previous image is 'copied'."""
    import interleaf.evaluate as evaluate
    from interleaf.data.shapes import ShapesWorld

    cfg = evaluate.EvalConfig(n_draw=0, n_caption=0, n_story=12, batch_size=5)
    world = ShapesWorld(resolution=64, max_shapes=cfg.max_shapes, seed=cfg.world_seed)
    pipe = types.SimpleNamespace(vqgan=PixelCodec())

    def next_scene(pipe, requests):
        docs = []
        for r in requests:
            _, _, after = world.story_step(r.params.seed - cfg.seed)
            assert r.params.mode == "image" and isinstance(r.prompt[1], Image.Image) and r.prompt[2].startswith("Then ")
            docs.append(types.SimpleNamespace(images=[world.render(after)]))
        return docs

    monkeypatch.setattr(evaluate, "_run_requests", next_scene)
    good = evaluate.eval_story(pipe, cfg, 1.5, progress=False)
    assert good["exact"] == 1.0 and good["copied"] == 0.0 and good["n"] == 12
    assert good["unchanged"]["exact"] == 0.0 and good["unchanged"]["colour"] < 1.0  # every step changes the scene
    monkeypatch.setattr(
        evaluate,
        "_run_requests",
        lambda pipe, requests: [types.SimpleNamespace(images=[r.prompt[1]]) for r in requests],
    )
    copy = evaluate.eval_story(pipe, cfg, 1.5, progress=False)
    assert copy["copied"] == 1.0 and copy["exact"] == 0.0
    assert {k: copy[k] for k in copy["unchanged"]} == copy["unchanged"]  # copying scores what leaving it unchanged does
    table = evaluate.format_report({"story": copy})
    assert "story step cfg 1.5" in table and "0.0% drawn as the text says, 100.0% the scene before" in table
