import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.data.shapes import ShapesWorld
from interleaf.errors import InterleafError
from interleaf.tokenizer.image import load_image, to_pil
from interleaf.tokenizer.multimodal import MarkerCountError, MultimodalTokenizer, parse_prompt_text
from interleaf.tokenizer.text import train_bpe
from interleaf.tokenizer.vocab import END_OF_TURN, ImageCodes, Vocabulary
from interleaf.tokenizer.vqgan import VQConfig, VQModel

WORLD = ShapesWorld(resolution=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def text():
    return train_bpe((t for i in range(40) for t in WORLD.texts(i)), vocab_size=400)


@pytest.fixture(scope="module")
def vqgan():
    torch.manual_seed(0)
    cfg = VQConfig(
        resolution=32,
        ch=16,
        ch_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        mid_attn=False,
        z_channels=16,
        norm_groups=8,
        n_embed=64,
        embed_dim=8,
        l2_norm=True,
    )
    return VQModel(cfg).eval()


@pytest.fixture(scope="module")
def tok(text, vqgan):
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=vqgan.config.n_embed, image_grid=vqgan.grid)
    return MultimodalTokenizer(vocab, text, vqgan)


def codes_of(vqgan, image) -> np.ndarray:
    with torch.no_grad():
        return vqgan.encode(load_image(image, vqgan.config.resolution)[None])[0].numpy()


def test_interleaved_round_trip(tok, vqgan, tmp_path):
    segments, _ = WORLD.document(0)
    path = tmp_path / "img.png"
    segments[1].save(path)
    given = ImageCodes(np.arange(64).reshape(8, 8) % 64)
    doc = segments[:1] + [path] + segments[2:] + [given, "é 👋 end"]
    ids = tok.encode(doc)
    v = tok.vocab
    n_images = sum(not isinstance(s, str) for s in doc)
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id
    assert ids.count(v.boi_id) == n_images == ids.count(v.eoi_id)
    assert len(ids) == len(tok.encode(doc, bos=False, eos=False)) + 2
    out = tok.decode(ids)
    assert out.ok and len(out.segments) == len(doc)
    for seg, back in zip(doc, out.segments):
        if isinstance(seg, str):
            assert back == seg
        elif isinstance(seg, ImageCodes):
            assert back == seg
        else:
            assert isinstance(back, ImageCodes) and np.array_equal(back.codes, codes_of(vqgan, seg))
    # text between images is tokenized exactly as the text tokenizer does
    assert tok.encode(["a small red circle"], bos=False, eos=False) == tok.text.encode("a small red circle")
    assert tok.decode(torch.tensor(ids)).segments == out.segments


def test_batched_encoding_matches_one_by_one(tok, vqgan):
    images = [WORLD.pair(i)[0] for i in range(17)]  # more than one VQ batch
    codes = tok.encode_images(images)
    for image, c in zip(images, codes):
        assert np.array_equal(c.codes, codes_of(vqgan, image))


def test_to_images_decodes_codes(tok, vqgan):
    grid = ImageCodes(np.random.default_rng(0).integers(0, 64, (8, 8)))
    pil = Image.new("RGB", (5, 5))
    out = tok.to_images(["text", grid, pil])
    assert out[0] == "text" and out[2] is pil
    assert out[1].size == (32, 32) and out[1].mode == "RGB"
    with torch.no_grad():
        expected = to_pil(vqgan.decode_code(torch.from_numpy(grid.codes)[None])[0])
    assert np.array_equal(np.asarray(out[1]), np.asarray(expected))


def test_plain_text_and_malformed_streams(tok):
    assert tok.decode(tok.encode("just text")).segments == ["just text"]
    v = tok.vocab
    broken = [v.bos_id, v.boi_id] + [int(v.code_to_id(np.array([1]))[0])] * 3 + [v.eos_id]
    out = tok.decode(broken)
    assert not out.ok and out.segments == []


def test_without_vqgan_only_codes(text):
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=16, image_grid=(2, 2))
    tok = MultimodalTokenizer(vocab, text)
    doc = ["a", ImageCodes(np.arange(4).reshape(2, 2)), "b"]
    assert tok.decode(tok.encode(doc)).segments == doc
    with pytest.raises(InterleafError, match="needs a VQ-GAN"):
        tok.encode(["x", Image.new("RGB", (8, 8))])
    with pytest.raises(InterleafError, match="needs a VQ-GAN"):
        tok.to_images(doc)


def test_bad_inputs(tok, text, vqgan, tmp_path):
    with pytest.raises(InterleafError, match="segment 1"):
        tok.encode(["a", 3])
    with pytest.raises(InterleafError, match="cannot read image"):
        tok.encode([tmp_path / "missing.png"])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(InterleafError, match="cannot read image"):
        tok.encode([not_image])
    with pytest.raises(InterleafError, match="code grid"):
        tok.encode([ImageCodes(np.zeros((3, 3)))])
    wrong = Vocabulary.build(n_text=text.vocab_size, n_codes=64, image_grid=(4, 4))
    with pytest.raises(InterleafError, match="code grids"):
        MultimodalTokenizer(wrong, text, vqgan)
    small = Vocabulary.build(n_text=text.vocab_size, n_codes=32, image_grid=(8, 8))
    with pytest.raises(InterleafError, match="codes"):
        MultimodalTokenizer(small, text, vqgan)
    # a vocabulary made for a smaller BPE: the text ids would run into its image codes
    narrow = Vocabulary.build(n_text=text.vocab_size - 1, n_codes=64, image_grid=(8, 8))
    assert narrow.size > text.vocab_size
    with pytest.raises(InterleafError, match="room for"):
        MultimodalTokenizer(narrow, text, vqgan)


def test_encoder_only_vqgan_cannot_draw(text, vqgan):
    cfg = VQConfig(**{**vqgan.config.__dict__, "has_decoder": False})
    enc_only = VQModel(cfg).eval()
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=64, image_grid=enc_only.grid)
    tok = MultimodalTokenizer(vocab, text, enc_only)
    ids = tok.encode(["x", WORLD.pair(0)[0]])
    assert len(ids) == 1 + len(text.encode("x")) + 2 + 64 + 1
    with pytest.raises(InterleafError, match="decoder"):
        tok.to_images(tok.decode(ids).segments)


def test_prompt_text_places_images_and_ends_turns():
    a, b = object(), object()
    assert parse_prompt_text("see <image> and <image><eot>", [a, b]) == ["see ", a, " and ", b, END_OF_TURN]
    assert parse_prompt_text("what is it?<eot>", [a]) == [a, "what is it?", END_OF_TURN]  # no marker: first
    assert parse_prompt_text("<eot>", []) == [END_OF_TURN] and parse_prompt_text("", [a]) == [a]
    assert parse_prompt_text("<eot >, <EOT> and <image ", []) == ["<eot >, <EOT> and <image "]  # exact spelling only
    with pytest.raises(MarkerCountError, match="2 <image> markers but 1 images"):
        parse_prompt_text("<image><eot><image>", [a])
