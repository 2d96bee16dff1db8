"""Text tokenizer: byte-level BPE trained with `tokenizers`, or an existing model brought along.

`train_bpe` learns a byte-level BPE whose ids 0..15 are the 16 special strings of
`interleaf.tokenizer.vocab.special_token_names()`, so text-tokenizer ids are model ids. Byte-level
means every Unicode string round-trips exactly: emoji, CJK, combining marks, control characters,
NUL, right-to-left text and zero-width joiners all become bytes first.

`TextTokenizer.load` also accepts any `tokenizer.json` (e.g. Chameleon's) and SentencePiece
`.model` files. Special tokens are never matched inside text: a document that contains the string
"<eos>" encodes it as ordinary characters, so user text cannot inject control tokens.

`decode_bytes(ids)` gives the raw bytes of tokens with no UTF-8 decoding, for streaming decoders
that must hold back an incomplete character; for byte-level tokenizers
`b"".join(decode_bytes([i]) for i in ids) == decode(ids).encode()`. SentencePiece-style models
(Metaspace / dummy prefix) drop the leading space of a whole sequence in `decode` only; their
`decode_bytes` keeps it so that per-token concatenation is stable.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from interleaf.errors import InterleafError
from interleaf.tokenizer.vocab import N_SPECIAL_SLOTS, special_token_names
from interleaf.utils import atomic_write, first_line, get_logger

HF_FILE = "tokenizer.json"
SPM_FILE = "spm.model"
MIN_VOCAB = N_SPECIAL_SLOTS + 256  # specials + the 256 byte tokens
MAX_VOCAB = 1 << 20  # far above any real text vocabulary; more would exhaust memory in training

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
log = get_logger(__name__)


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InterleafError(f"text is not valid Unicode (position {e.start}: {e.reason})") from None


def _decoder_types(node) -> set[str]:
    """All decoder/pre-tokenizer type names in a tokenizer.json section (nested sequences)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for v in node.values():
            found |= _decoder_types(v)
        return found
    if isinstance(node, list):
        return set().union(*(_decoder_types(v) for v in node)) if node else set()
    return set()


class TextTokenizer:
    """Text <-> ids through a `tokenizers.Tokenizer` or a SentencePiece model."""

    def __init__(self, hf=None, spm=None):
        if (hf is None) == (spm is None):
            raise ValueError("TextTokenizer wants exactly one of hf= or spm=")
        self._hf, self._spm = hf, spm
        if hf is not None:
            hf.encode_special_tokens = True  # "<eos>" inside text stays text
            self._table, self._byte_level, self._strip_prefix = _hf_byte_table(hf)
        else:
            self._table, self._byte_level, self._strip_prefix = _spm_byte_table(spm)

    # ---- properties ----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """'tokenizers' or 'sentencepiece'."""
        return "tokenizers" if self._hf is not None else "sentencepiece"

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return len(self._table)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (special or piece), or None."""
        if self._hf is not None:
            return self._hf.token_to_id(token)
        i = self._spm.piece_to_id(token)
        return None if i == self._spm.unk_id() and token != self._spm.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or None outside the vocabulary."""
        if not 0 <= i < self.vocab_size:
            return None
        return self._hf.id_to_token(i) if self._hf is not None else self._spm.id_to_piece(i)

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added."""
        if not isinstance(text, str):
            raise InterleafError(f"can only encode text (str), got {type(text).__name__}")
        if not text:
            return []
        _utf8(text)  # lone surrogates: a clear error instead of the library's TypeError
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._spm.encode(text, out_type=int)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Raw bytes of these tokens (specials and unknown ids give nothing); may end mid-character."""
        table, n = self._table, len(self._table)
        return b"".join(table[i] for i in map(int, ids) if 0 <= i < n)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (special tokens skipped; invalid UTF-8 becomes U+FFFD)."""
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        if self._strip_prefix and text.startswith(" "):
            text = text[1:]
        return text

    # ---- files ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` (or `spm.model`) into `directory`; returns the file."""
        directory = Path(directory)
        if self._hf is not None:
            path = directory / HF_FILE
            with atomic_write(path) as f:
                f.write(self._hf.to_str())
        else:
            path = directory / SPM_FILE
            with atomic_write(path, "wb") as f:
                f.write(self._spm.serialized_model_proto())
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> TextTokenizer:
        """Load `tokenizer.json` or a SentencePiece `.model` (a file, or a directory holding one)."""
        path = _find_tokenizer_file(Path(directory_or_file))
        if path.suffix == ".json":
            return cls(hf=_load_hf(path))
        return cls(spm=_load_spm(path))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.kind}, vocab_size={self.vocab_size})"


def _find_tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for name in (HF_FILE, SPM_FILE):
            if (path / name).is_file():
                return path / name
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return models[0]
        raise InterleafError(f"no {HF_FILE} or SentencePiece .model file in {path}")
    if not path.is_file():
        raise InterleafError(f"tokenizer file not found: {path}")
    if path.suffix not in (".json", ".model"):
        raise InterleafError(f"tokenizer file {path} must be a tokenizer.json or a SentencePiece .model")
    return path


def _load_hf(path: Path):
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed files
        raise InterleafError(f"cannot read tokenizer {path}: {first_line(e)}") from None


def _load_spm(path: Path):
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise InterleafError(f"cannot read SentencePiece model {path}: {first_line(e)}") from None
    return sp


def _hf_byte_table(tok) -> tuple[list[bytes], bool, bool]:
    """Per-id bytes of a tokenizers model, whether it is byte-level, whether decode strips a prefix space."""
    spec = json.loads(tok.to_str())
    types = _decoder_types(spec.get("decoder")) | _decoder_types(spec.get("pre_tokenizer"))
    byte_level = "ByteLevel" in types
    # Metaspace / Llama-style decoders drop the space the encoder put before the first word
    metaspace = bool({"Metaspace", "Strip"} & types)
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    inverse = byte_level_decoder()
    table = []
    for i in range(tok.get_vocab_size(with_added_tokens=True)):
        token = tok.id_to_token(i)
        if token is None or i in specials:
            table.append(b"")
        elif i in added:
            table.append(token.encode("utf-8"))
        elif byte_level:
            table.append(
                bytes(inverse[c] for c in token) if all(c in inverse for c in token) else token.encode("utf-8")
            )
        else:
            table.append(_piece_bytes(token))
    return table, byte_level, metaspace and not byte_level


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece-style piece: <0xNN> is one byte, '▁' is a space."""
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def _spm_byte_table(sp) -> tuple[list[bytes], bool, bool]:
    table = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i):
            table.append(b"")
        elif sp.is_unknown(i):
            table.append(" \u2047 ".encode("utf-8"))  # what sentencepiece itself prints
        else:
            table.append(_piece_bytes(sp.id_to_piece(i)))
    return table, False, True


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> TextTokenizer:
    """Train a byte-level BPE on `texts`; ids 0..15 are the special tokens, then 256 bytes, then merges."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise InterleafError(
            f"BPE vocab_size must be {MIN_VOCAB} (16 specials + 256 bytes) to {MAX_VOCAB:,}, got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_token_names(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    counter = _Counter(texts)
    _train_in_thread(tok, counter, trainer)
    if counter.n_chars == 0:
        raise InterleafError("the BPE training corpus is empty (no text found)")
    out = TextTokenizer(hf=tok)
    for i, name in enumerate(special_token_names()):
        assert out.token_to_id(name) == i, "special tokens must come first"
    log.debug("trained BPE on %d texts (%d characters): %d tokens", counter.n_texts, counter.n_chars, out.vocab_size)
    return out


def _train_in_thread(tok, texts: Iterable[str], trainer) -> None:
    """`tok.train_from_iterator` in a daemon thread, so that Ctrl-C stops training at once.

    The Rust trainer releases the GIL but never checks for signals, and Python runs signal
    handlers only in the main thread, between bytecodes: called from the main thread it holds
    KeyboardInterrupt back until training ends, minutes on a big corpus. Here the main thread
    waits in short joins (a signal delivered to another thread wakes no untimed join) and raises
    KeyboardInterrupt at once. Nothing can stop the Rust side, so an interrupted training runs on
    in the background until it ends; a daemon thread does not hold up interpreter exit (no
    ThreadPoolExecutor: its atexit hook would join the worker), and the CLI exits right away.
    """
    failure: list[BaseException] = []

    def work():
        try:
            tok.train_from_iterator(texts, trainer)
        except BaseException as e:  # handed to the main thread, which raises it
            failure.append(e)

    thread = threading.Thread(target=work, name="train-bpe", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if failure:
        raise failure[0]


class _Counter:
    """Iterate texts, counting texts and characters (checked: only str, no lone surrogates)."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.n_texts = 0
        self.n_chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise InterleafError(f"BPE training texts must be str, got {type(text).__name__}")
            if not text:
                continue
            _utf8(text)
            self.n_texts += 1
            self.n_chars += len(text)
            yield text
        if self.n_texts:  # the trainer goes silent for the merges, which can take minutes
            log.info("read %s texts (%s characters); learning merges", f"{self.n_texts:,}", f"{self.n_chars:,}")
