import json
import random
import signal
import string
import subprocess
import sys
import threading
import unicodedata

import pytest

from interleaf.cli import main
from interleaf.errors import InterleafError
from interleaf.tokenizer.text import TextTokenizer, byte_level_decoder, train_bpe
from interleaf.tokenizer.vocab import special_token_names

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Le cœur a ses raisons que la raison ne connaît point.",
    "東京は日本の首都です。北京是中国的首都。",
    "Привет, мир! Как дела?",
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "emoji: 👋🏽 👨‍👩‍👧 🇯🇵 ❤️",
    "a large red circle at the top left and a small blue square in the center",
] * 20

HOSTILE = [
    "",
    " ",
    "  leading and trailing  ",
    "\n\n\t\r\n\x0b\x0c",
    "nul\x00byte and \x01\x02\x1f\x7f controls",
    "👋🏽👨‍👩‍👧‍👦🏳️‍🌈🇯🇵🇺🇸",  # skin tones, ZWJ sequences, flags
    "漢字かなカナ한국어中文",
    "e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d",  # combining marks (zalgo)
    "مرحبا بالعالم שלום עולם",  # right-to-left
    "\u202eRTL override\u202c and \u200b zero\u200dwidth\ufeff",
    "mixed: abc АБВ αβγ 中文 😀 ١٢٣ 𝕏𝔸𝕄",
    "\U0010ffff\U000e0001 private \ue000 planes",
    "<bos>not special<eos><boi><pad><reserved_3>",
    "x" * 50_000,
    "🙂" * 5_000,
    "word " * 10_000,
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_bpe(CORPUS, vocab_size=600)


def random_text(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        c = rng.randrange(0x110000)
        if 0xD800 <= c <= 0xDFFF:  # lone surrogates are not valid UTF-8
            continue
        out.append(chr(c))
    return "".join(out)


def test_specials_first_and_sizes(tok):
    assert tok.vocab_size <= 600 and tok.vocab_size > 16 + 256
    for i, name in enumerate(special_token_names()):
        assert tok.token_to_id(name) == i
        assert tok.decode_bytes([i]) == b""
    # ids 16..271 are the 256 single bytes
    assert sorted(tok.decode_bytes([i]) for i in range(16, 272)) == [bytes([b]) for b in range(256)]
    assert all(i >= 16 for i in tok.encode("hello <eos> world"))
    assert len(byte_level_decoder()) == 256


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(16 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_random_unicode_round_trip(tok):
    rng = random.Random(0)
    for n in (1, 7, 64, 500):
        for _ in range(10):
            text = random_text(rng, n)
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert tok.decode_bytes(ids) == text.encode("utf-8")
    # normalisation is not applied: NFC and NFD stay distinct
    s = "café"
    assert tok.decode(tok.encode(unicodedata.normalize("NFD", s))) == unicodedata.normalize("NFD", s)


def test_decode_bytes_streams_partial_characters(tok):
    text = "日本👋🏽 ok"
    ids = tok.encode(text)
    pieces = [tok.decode_bytes([i]) for i in ids]
    assert any(p and not _valid_utf8(p) for p in pieces)  # some tokens split characters
    buf, out = b"", []
    for p in pieces:  # a streaming decoder holding back incomplete characters
        buf += p
        k = len(buf)
        while k and not _valid_utf8(buf[:k]):
            k -= 1
        out.append(buf[:k].decode())
        buf = buf[k:]
    assert "".join(out) == text and not buf


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_learns_merges_and_compresses(tok):
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(text)) < len(text.encode()) / 2
    assert tok.decode([99999, -1]) == ""  # unknown ids are skipped


def test_lone_surrogate_and_bad_input(tok):
    with pytest.raises(InterleafError, match="not valid Unicode"):
        tok.encode("a\udc80b")
    with pytest.raises(InterleafError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_empty_corpus_and_bad_vocab_size():
    with pytest.raises(InterleafError, match="empty"):
        train_bpe([], vocab_size=300)
    with pytest.raises(InterleafError, match="empty"):
        train_bpe(iter(["", ""]), vocab_size=300)
    with pytest.raises(InterleafError, match="272"):
        train_bpe(CORPUS, vocab_size=100)


def test_save_load_tokenizer_json(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    for src in (tmp_path, path):
        again = TextTokenizer.load(src)
        assert again.vocab_size == tok.vocab_size
        for text in HOSTILE[:13]:
            assert again.encode(text) == tok.encode(text)
            assert again.decode(again.encode(text)) == text


def test_load_errors(tmp_path):
    with pytest.raises(InterleafError, match="not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    with pytest.raises(InterleafError, match="no tokenizer.json"):
        TextTokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InterleafError, match="cannot read tokenizer"):
        TextTokenizer.load(bad)
    bad_spm = tmp_path / "x.model"
    bad_spm.write_bytes(b"\x00garbage")
    with pytest.raises(InterleafError, match="SentencePiece"):
        TextTokenizer.load(bad_spm)


def test_chameleon_style_tokenizer_json(tmp_path):
    """A BPE with a Split + ByteLevel(use_regex=False) pre-tokenizer and its own specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s*\S+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<racm3:break>", "<eoss>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(CORPUS, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path / "tokenizer.json")
    for text in HOSTILE[:13]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode_bytes(ids) == text.encode()
    assert tok.decode_bytes([tok.token_to_id("<racm3:break>")]) == b""


def test_metaspace_tokenizer_json(tmp_path):
    """SentencePiece-style BPE in tokenizer.json (Metaspace, leading space dropped on decode)."""
    from tokenizers import SentencePieceBPETokenizer

    hf = SentencePieceBPETokenizer()
    hf.train_from_iterator(CORPUS, vocab_size=400, show_progress=False, special_tokens=["<unk>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path / "tokenizer.json")
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert tok.decode(ids) == text == hf.decode(ids)
    assert tok.decode_bytes(ids) == b" " + text.encode()  # per-token bytes keep the prefix space


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS),
            model_writer=f,
            vocab_size=400,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.98,
            minloglevel=2,
            num_threads=1,
        )
    return path


def test_sentencepiece_model(spm_model, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = TextTokenizer.load(spm_model)
    assert tok.kind == "sentencepiece" and tok.vocab_size == sp.get_piece_size()
    for text in ["The quick brown fox.", "東京 👋 unseen ẞ characters", "a large red circle"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text  # byte fallback makes unseen characters exact
        assert tok.decode_bytes(ids) == b" " + text.encode()
    # bytes of a character split over byte pieces come back one by one
    emoji_ids = tok.encode("👋")
    assert b"".join(tok.decode_bytes([i]) for i in emoji_ids) == " 👋".encode()
    # save writes spm.model; a directory holding it loads
    path = tok.save(tmp_path)
    assert path.name == "spm.model"
    assert TextTokenizer.load(tmp_path).encode("The quick brown fox.") == tok.encode("The quick brown fox.")


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_train_bpe_end_to_end(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(CORPUS[:7] * 5) + "\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["héllo wörld", "ünïcödé 👋"]) + "\n")
    out = tmp_path / "bpe"
    rc = main(["train-bpe", "vocab_size=600", "--shapes", "20", "-i", str(text), "-i", str(jsonl), "-o", str(out)])
    assert rc == 0
    assert "trained BPE" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "bpe.yaml").is_file()
    tok = TextTokenizer.load(out)
    for s in ["a large red circle at the top left", "ünïcödé 👋", HOSTILE[4]]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(" circle")) == 1  # learned from the shapes world
    assert len(tok.encode(" quick")) == 1  # learned from the text file


def test_cli_train_bpe_from_config(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "bpe" / "shapes-tiny.yaml"
    rc = main(["train-bpe", str(config), "shapes.samples=30", f"out={tmp_path / 'tok'}"])
    assert rc == 0
    tok = TextTokenizer.load(tmp_path / "tok")
    words = ["Then", "Ġthe", "Ġred", "Ġcircle", "Ġmoves", "Ġto", "Ġthe", "Ġbottom", "Ġright", "."]
    assert tok.encode("Then the red circle moves to the bottom right.") == [tok.token_to_id(t) for t in words]


def test_cli_train_bpe_errors(tmp_path, capsys):
    assert main(["train-bpe", "-i", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["train-bpe", "--shapes", "5"]) == 2  # no output directory
    assert "out" in capsys.readouterr().err
    assert main(["train-bpe", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train-bpe", "-i", str(empty), "-o", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    assert main(["train-bpe", "-i", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "tokenizer.json").exists()


def test_cli_train_bpe_from_shards_and_document_jsonl(tmp_path):
    from interleaf.data.shapes import ShapesWorld
    from interleaf.training.shards import write_documents

    world = ShapesWorld(resolution=32)
    docs = [(f"doc{i}", world.document(i)[0], None) for i in range(30)]
    write_documents(docs, tmp_path / "shards")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        json.dumps(["zebra " * 5, {"image": "x.png"}])
        + "\n"
        + json.dumps({"segments": [{"text": "quokka " * 5}]})
        + "\n"
    )
    out = tmp_path / "bpe"
    rc = main(
        [
            "train-bpe",
            "-i",
            str(tmp_path / "shards" / "*.tar"),
            "-i",
            str(jsonl),
            "vocab_size=500",
            "min_frequency=1",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    tok = TextTokenizer.load(out)
    for word in (" triangle", " appears", " zebra", " quokka"):
        assert len(tok.encode(word)) == 1, word


def test_cli_train_bpe_stops_at_once_on_ctrl_c(tmp_path):
    """Ctrl-C during the merges (native code that never checks for signals) ends the run at once."""
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=40)) for _ in range(50_000)] * 2
    corpus = tmp_path / "corpus.txt"  # 4 MB of long words: ~10 s of merges on 2 cores, ~0.2 s to read
    corpus.write_text("\n".join(" ".join(words[i : i + 5]) for i in range(0, len(words), 5)) + "\n")
    out = tmp_path / "bpe"
    cmd = [sys.executable, "-m", "interleaf", "train-bpe", "vocab_size=300000", "-i", str(corpus), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)  # a run that never logs must not hang the suite
    watchdog.start()
    try:
        for line in proc.stderr:  # the corpus is read: the merges have begun
            if "learning merges" in line:
                break
        else:
            pytest.fail(f"train-bpe ended before its merges: rc={proc.wait()}")
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=3)  # ~0.5 s here, 0.4 s of it torch's own exit
        except subprocess.TimeoutExpired:
            pytest.fail("train-bpe ignored Ctrl-C for 3 s")
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert stderr == "interleaf train-bpe: interrupted\n" and stdout == ""
    assert list(tmp_path.iterdir()) == [corpus]  # no output directory, tokenizer.json or temp file


def test_training_is_deterministic(tok):
    again = train_bpe(CORPUS, vocab_size=600)
    assert again._hf.to_str() == tok._hf.to_str()
