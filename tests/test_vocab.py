import numpy as np
import pytest
import torch

from interleaf.errors import InterleafError
from interleaf.tokenizer.vocab import END_OF_TURN, ImageCodes, Vocabulary, id_runs, ids_of_runs, special_token_names


def text_codec():
    # a stand-in text codec over ids 16..(16+256): one id per byte
    def enc(s):
        return [16 + b for b in s.encode("utf-8")]

    def dec(ids):
        return bytes(i - 16 for i in ids).decode("utf-8", errors="replace")

    return enc, dec


@pytest.fixture
def vocab():
    return Vocabulary.build(n_text=16 + 256, n_codes=32, image_grid=(2, 3))


def test_layout(vocab):
    assert vocab.size % 64 == 0 and vocab.size >= 16 + 256 + 32
    assert [vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.boi_id, vocab.eoi_id] == [0, 1, 2, 3, 4]
    assert vocab.tokens_per_image == 6
    text, image = vocab.text_mask(), vocab.image_mask()
    assert not (text & image).any()
    assert text.sum() == 256 and image.sum() == 32
    assert not text[:16].any() and not text[16 + 256 + 32 :].any()
    codes = np.arange(32)
    assert np.array_equal(vocab.id_to_code(vocab.code_to_id(codes)), codes)
    assert torch.equal(vocab.id_to_code(vocab.code_to_id(torch.arange(32))), torch.arange(32))


def test_mixed_round_trip(vocab):
    enc, dec = text_codec()
    rng = np.random.default_rng(0)
    doc = [
        "héllo 👋",
        ImageCodes(rng.integers(0, 32, (2, 3))),
        " then ",
        ImageCodes(rng.integers(0, 32, (2, 3))),
        "end",
    ]
    ids = vocab.encode_document(doc, enc)
    assert ids[0] == vocab.bos_id and ids[-1] == vocab.eos_id
    assert ids.count(vocab.boi_id) == 2 and ids.count(vocab.eoi_id) == 2
    out = vocab.decode_document(ids, dec)
    assert out.ok and out.segments == doc


def test_text_only_and_image_only(vocab):
    enc, dec = text_codec()
    assert vocab.decode_document(vocab.encode_document(["abc"], enc), dec).segments == ["abc"]
    img = ImageCodes(np.arange(6).reshape(2, 3))
    assert vocab.decode_document(vocab.encode_document([img], enc, bos=False, eos=False), dec).segments == [img]


def test_imported_table_keeps_ids():
    specials = {name: 100 + i for i, name in enumerate(special_token_names()[:5])}
    table = [7, 3, 50, 11]  # arbitrary, non-contiguous
    v = Vocabulary(size=128, n_text=128, image_ids=table, image_grid=(2, 2), specials=specials)
    assert v.code_to_id(np.array([0, 1, 2, 3])).tolist() == table
    assert not v.is_text(7) and v.is_image(7) and v.is_text(8) and not v.is_text(100)
    w = Vocabulary.from_dict(v.to_dict())
    assert w.image_ids == table and w.specials == specials


def test_save_load(tmp_path, vocab):
    vocab.save(tmp_path)
    w = Vocabulary.load(tmp_path)
    assert w.to_dict() == vocab.to_dict()


@pytest.mark.parametrize(
    "ids_fn, expect",
    [
        (lambda v, c: [v.boi_id] + c[:3], "unfinished after 3 of 6"),
        (lambda v, c: [v.boi_id] + c[:3] + [v.eoi_id], "closed after 3 of 6"),
        (lambda v, c: [v.boi_id] + c + c[:1] + [v.eoi_id], "more than 6"),
        (lambda v, c: c[:2], "outside <boi>"),
        (lambda v, c: [v.eoi_id], "<eoi> outside"),
        (lambda v, c: [v.boi_id] + c[:2] + [16 + 65], "interrupted after 2"),
        (lambda v, c: [10_000, -1], "outside the vocabulary"),
        (lambda v, c: [v.size - 1], "padding"),
    ],
)
def test_malformed_streams_are_reported_not_raised(vocab, ids_fn, expect):
    enc, dec = text_codec()
    codes = vocab.code_to_id(np.arange(6)).tolist()
    out = vocab.decode_document([16 + 104] + ids_fn(vocab, codes), dec)
    assert not out.ok and any(expect in p for p in out.problems), out.problems
    assert out.segments[0].startswith("h")


def test_encode_rejects_wrong_grid(vocab):
    enc, _ = text_codec()
    with pytest.raises(Exception, match="2x3"):
        vocab.encode_document([ImageCodes(np.zeros((3, 3), dtype=int))], enc)


def test_end_of_turn_round_trips_and_is_the_first_reserved_slot(vocab):
    enc, dec = text_codec()
    doc = ["question?", END_OF_TURN, ImageCodes(np.arange(6).reshape(2, 3)), "answer", END_OF_TURN]
    ids = vocab.encode_document(doc, enc)
    assert vocab.eot_id == vocab.specials["<reserved_0>"] == 5 and ids.count(5) == 2
    out = vocab.decode_document(ids, dec)
    assert out.ok and out.segments == doc
    assert not vocab.text_mask()[5]  # a special: never text


def test_vocab_json_of_before_the_end_of_turn_and_other_specials_still_loads(vocab):
    old = vocab.to_dict()
    del old["other_specials"]
    del old["specials"]["<eot>"]
    w = Vocabulary.from_dict(old)
    assert w.eot_id == vocab.eot_id and w.other_specials == [] and w.to_dict() == vocab.to_dict()


def test_other_specials_are_never_text_and_stored_as_runs():
    specials = {name: 100 + i for i, name in enumerate(special_token_names()[:5])}
    others = [7, 8, 9, 10, 40, 41, 90]
    v = Vocabulary(size=128, n_text=110, image_ids=[1, 2, 3, 4], image_grid=(2, 2), specials=specials,
                   other_specials=others)  # fmt: skip
    assert not any(v.is_text(i) for i in others) and v.is_text(11) and not v.text_mask()[others].any()
    assert v.to_dict()["other_specials"] == [[7, 4], [40, 2], [90, 1]]
    assert Vocabulary.from_dict(v.to_dict()).other_specials == others
    assert ids_of_runs(id_runs([5, 6, 2, 3, 4, 9])) == [5, 6, 2, 3, 4, 9]  # order kept
    with pytest.raises(InterleafError, match="no end-of-turn token"):
        v.encode_document(["hi", END_OF_TURN], lambda s: [11])
    with pytest.raises(InterleafError, match="special ids fall outside"):
        Vocabulary(size=128, n_text=110, image_ids=[1], image_grid=(1, 1), specials=specials, other_specials=[128])
    with pytest.raises(InterleafError, match="image code onto a special"):
        Vocabulary(size=128, n_text=110, image_ids=[7], image_grid=(1, 1), specials=specials, other_specials=[7])
