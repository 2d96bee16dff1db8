"""The shared id space: special tokens, text tokens and image codes in one vocabulary.

Default layout (a model trained with interleaf):

    [0, 16)                 special tokens (<pad> <bos> <eos> <boi> <eoi> + reserved slots);
                            the BPE tokenizer is trained with them first, so they are text-tokenizer
                            ids too
    [16, n_text)            BPE text tokens
    [n_text, n_text+codes)  image codes, code i -> id n_text + i
    [..., size)             padding so that size is a multiple of 64 (never sampled)

An imported vocabulary (e.g. Chameleon's) keeps its own ids: specials map by name, image codes
map through an arbitrary table `image_ids`, the ids of its other special tokens (Chameleon's
thousands of `<reserved#####>` and other `<…>` names, recorded at conversion) are `other_specials`,
and everything else below `n_text` is text. Specials of either kind are never text, so the sampler
never draws one in text mode.

The end of a turn (`END_OF_TURN`: after a user's prompt, before the model's answer) is one
special token with the role `<eot>`: Chameleon's `<reserved08706>`, the default layout's first
reserved slot. A vocabulary without one refuses it.

A document is a list of segments: `str` for text, `ImageCodes` for a tokenized image, `END_OF_TURN`.
The vocabulary turns a document into ids (`<boi> codes <eoi>` around each image) and ids back into a
document; a malformed stream is decoded as far as it makes sense and its problems are reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interleaf.errors import InterleafError
from interleaf.utils import read_text, write_json

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")
N_SPECIAL_SLOTS = 16  # the five above + reserved slots "<reserved_0>" ... for future use
END_OF_TURN_NAME = "<eot>"  # the end-of-turn token's role in `specials`, and how a prompt's text writes it
DEFAULT_END_OF_TURN_SLOT = "<reserved_0>"  # the default layout's end of a turn
VOCAB_FILE = "vocab.json"


def special_token_names() -> list[str]:
    """The 16 special-token strings of the default layout, in id order."""
    reserved = [f"<reserved_{i}>" for i in range(N_SPECIAL_SLOTS - len(SPECIAL_TOKENS))]
    return list(SPECIAL_TOKENS) + reserved


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return (n + multiple - 1) // multiple * multiple


def id_runs(ids: Sequence[int]) -> list[list[int]]:
    """Ids as `[start, count]` runs of consecutive ids, in order: how vocab.json stores a long id list."""
    runs: list[list[int]] = []
    for i in map(int, ids):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def ids_of_runs(runs: Sequence[Sequence[int]]) -> list[int]:
    """Inverse of id_runs."""
    return [i for start, count in runs for i in range(int(start), int(start) + int(count))]


@dataclass
class ImageCodes:
    """One tokenized image: a grid of codebook indices, shape (h, w)."""

    codes: np.ndarray

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2:
            raise ValueError(f"ImageCodes wants a 2-D grid of codes, got shape {self.codes.shape}")

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageCodes) and np.array_equal(self.codes, other.codes)


@dataclass(frozen=True)
class EndOfTurn:
    """The end of a turn in a document or prompt: one special token (the vocabulary's `<eot>`)."""

    def __repr__(self) -> str:
        return "END_OF_TURN"


END_OF_TURN = EndOfTurn()
Segment = str | ImageCodes | EndOfTurn


@dataclass
class DecodedDocument:
    """Result of decoding ids: the segments that made sense, and what did not."""

    segments: list[Segment]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Vocabulary:
    """Maps special tokens, text-tokenizer ids and image codes into one model id space."""

    size: int
    n_text: int
    image_ids: list[int]
    image_grid: tuple[int, int]
    specials: dict[str, int]  # role name -> id
    other_specials: list[int] = field(default_factory=list)  # special ids without a role here: never text

    def __post_init__(self):
        self.image_grid = (int(self.image_grid[0]), int(self.image_grid[1]))
        for name in SPECIAL_TOKENS:
            if name not in self.specials:
                raise InterleafError(f"vocabulary lacks the special token {name}")
        if END_OF_TURN_NAME not in self.specials and DEFAULT_END_OF_TURN_SLOT in self.specials:
            # the default layout, also as written before the end-of-turn role existed
            self.specials = {**self.specials, END_OF_TURN_NAME: self.specials[DEFAULT_END_OF_TURN_SLOT]}
        self.other_specials = sorted({int(i) for i in self.other_specials})
        ids = np.asarray(self.image_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise InterleafError("vocabulary image ids fall outside the id space")
        if len(np.unique(ids)) != len(ids):
            raise InterleafError("vocabulary maps two image codes to the same id")
        if self.other_specials and (self.other_specials[0] < 0 or self.other_specials[-1] >= self.size):
            raise InterleafError("vocabulary special ids fall outside the id space")
        special_ids = set(self.specials.values()) | set(self.other_specials)
        if special_ids & set(ids.tolist()):
            raise InterleafError("vocabulary maps an image code onto a special token")
        self._code_of = np.full(self.size, -1, dtype=np.int64)
        self._code_of[ids] = np.arange(len(ids))
        self._image_ids = ids
        self._special_ids = special_ids

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def build(cls, n_text: int, n_codes: int, image_grid: tuple[int, int], multiple: int = 64) -> Vocabulary:
        """Default layout: specials, then `n_text - 16` BPE tokens, then `n_codes` image codes."""
        if n_text <= N_SPECIAL_SLOTS:
            raise InterleafError(f"text vocabulary of {n_text} ids leaves no room after {N_SPECIAL_SLOTS} specials")
        if n_codes <= 0:
            raise InterleafError("an image codebook needs at least one code")
        specials = {name: i for i, name in enumerate(special_token_names())}
        return cls(
            size=round_up(n_text + n_codes, multiple),
            n_text=n_text,
            image_ids=list(range(n_text, n_text + n_codes)),
            image_grid=tuple(image_grid),
            specials=specials,
        )

    def check_fits(self, n_outputs: int, source: str) -> None:
        """InterleafError unless every id of this vocabulary is one of a model's `n_outputs` logits."""
        if self.size > n_outputs:
            raise InterleafError(
                f"{source}: the vocabulary's {self.size} ids do not fit the model's {n_outputs} outputs"
            )

    # ---- ids --------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.specials["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.specials["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.specials["<eos>"]

    @property
    def boi_id(self) -> int:
        return self.specials["<boi>"]

    @property
    def eoi_id(self) -> int:
        return self.specials["<eoi>"]

    @property
    def eot_id(self) -> int:
        """The end-of-turn token; InterleafError when this vocabulary has none."""
        if END_OF_TURN_NAME not in self.specials:
            raise InterleafError(
                f"this model's vocabulary has no end-of-turn token: take {END_OF_TURN_NAME} "
                "(END_OF_TURN) out of the prompt"
            )
        return self.specials[END_OF_TURN_NAME]

    @property
    def n_codes(self) -> int:
        return len(self._image_ids)

    @property
    def tokens_per_image(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    def code_to_id(self, codes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Image codes (any shape) -> token ids."""
        if isinstance(codes, torch.Tensor):
            return torch.as_tensor(self._image_ids, device=codes.device)[codes.long()]
        return self._image_ids[np.asarray(codes, dtype=np.int64)]

    def id_to_code(self, ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Token ids -> image codes (-1 where an id is not an image token)."""
        if isinstance(ids, torch.Tensor):
            return torch.as_tensor(self._code_of, device=ids.device)[ids.long()]
        return self._code_of[np.asarray(ids, dtype=np.int64)]

    def is_image(self, token_id: int) -> bool:
        return 0 <= token_id < self.size and self._code_of[token_id] >= 0

    def is_text(self, token_id: int) -> bool:
        """A plain text token: below n_text, not special, not an image code."""
        return 0 <= token_id < self.n_text and token_id not in self._special_ids and self._code_of[token_id] < 0

    def image_mask(self) -> torch.Tensor:
        """Bool (size,): True on image-code ids."""
        return torch.from_numpy(self._code_of >= 0)

    def text_mask(self) -> torch.Tensor:
        """Bool (size,): True on plain text ids (no specials, no image codes, no padding)."""
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[: self.n_text] = True
        mask[torch.from_numpy(self._code_of >= 0)] = False
        mask[list(self._special_ids)] = False
        return mask

    # ---- documents -----------------------------------------------------------------------
    def encode_document(
        self, segments: Sequence[Segment], encode_text: Callable[[str], list[int]], bos: bool = True, eos: bool = True
    ) -> list[int]:
        """Segments -> ids: text through `encode_text`, images as <boi> codes <eoi>, END_OF_TURN as <eot>."""
        ids = [self.bos_id] if bos else []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                ids.extend(encode_text(seg))
            elif isinstance(seg, EndOfTurn):
                ids.append(self.eot_id)
            elif isinstance(seg, ImageCodes):
                if seg.codes.shape != self.image_grid:
                    raise InterleafError(
                        f"segment {i}: image has a {seg.codes.shape[0]}x{seg.codes.shape[1]} code grid, "
                        f"the vocabulary expects {self.image_grid[0]}x{self.image_grid[1]}"
                    )
                if seg.codes.min() < 0 or seg.codes.max() >= self.n_codes:
                    raise InterleafError(f"segment {i}: image code outside [0, {self.n_codes})")
                ids.append(self.boi_id)
                ids.extend(self._image_ids[seg.codes.reshape(-1)].tolist())
                ids.append(self.eoi_id)
            else:
                raise InterleafError(f"segment {i}: expected text, ImageCodes or END_OF_TURN, got {type(seg).__name__}")
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode_document(self, ids: Sequence[int], decode_text: Callable[[list[int]], str]) -> DecodedDocument:
        """Ids -> segments. Never raises on a malformed stream: problems are listed instead."""
        segments: list[Segment] = []
        problems: list[str] = []
        text: list[int] = []
        image: list[int] | None = None  # codes of the image being read, None in text mode
        n = self.tokens_per_image
        eot = self.specials.get(END_OF_TURN_NAME)

        def flush_text():
            if text:
                segments.append(decode_text(list(text)))
                text.clear()

        for pos, raw in enumerate(ids):
            t = int(raw)
            if not 0 <= t < self.size:
                problems.append(f"position {pos}: id {t} is outside the vocabulary (size {self.size})")
                continue
            if image is not None:
                code = self._code_of[t]
                if code >= 0:
                    if len(image) == n:
                        problems.append(f"position {pos}: image has more than {n} codes; extra code dropped")
                    else:
                        image.append(int(code))
                    continue
                if t == self.eoi_id:
                    if len(image) == n:
                        segments.append(ImageCodes(np.asarray(image).reshape(self.image_grid)))
                    else:
                        problems.append(f"position {pos}: image closed after {len(image)} of {n} codes; dropped")
                    image = None
                    continue
                problems.append(f"position {pos}: image interrupted after {len(image)} of {n} codes; dropped")
                image = None
                # fall through: handle `t` in text mode
            if t == self.boi_id:
                flush_text()
                image = []
            elif t == self.eoi_id:
                problems.append(f"position {pos}: <eoi> outside an image; ignored")
            elif self._code_of[t] >= 0:
                problems.append(f"position {pos}: image code outside <boi>...<eoi>; ignored")
            elif t in (self.bos_id, self.pad_id):
                continue
            elif t == self.eos_id:
                flush_text()
            elif t == eot:
                flush_text()
                segments.append(END_OF_TURN)
            elif t in self._special_ids or t >= self.n_text:
                problems.append(f"position {pos}: unexpected special or padding id {t}; ignored")
            else:
                text.append(t)
        flush_text()
        if image is not None:
            problems.append(f"end of stream: image unfinished after {len(image)} of {n} codes; dropped")
        return DecodedDocument(segments, problems)

    # ---- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ids = self._image_ids
        contiguous = bool(len(ids)) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids)))
        return {
            "size": self.size,
            "n_text": self.n_text,
            "image_grid": list(self.image_grid),
            "specials": dict(self.specials),
            # a contiguous table is stored as its start and length, an imported one in full
            "image_ids": {"start": int(ids[0]), "count": len(ids)} if contiguous else ids.tolist(),
            "other_specials": id_runs(self.other_specials),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        try:
            image_ids = d["image_ids"]
            if isinstance(image_ids, dict):
                image_ids = list(range(image_ids["start"], image_ids["start"] + image_ids["count"]))
            return cls(
                size=int(d["size"]),
                n_text=int(d["n_text"]),
                image_ids=[int(i) for i in image_ids],
                image_grid=tuple(d["image_grid"]),
                specials={str(k): int(v) for k, v in d["specials"].items()},
                other_specials=ids_of_runs(d.get("other_specials", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InterleafError(f"malformed vocabulary: {e!r}") from None

    def save(self, directory: str | Path) -> Path:
        """Write `vocab.json` into `directory`."""
        path = Path(directory) / VOCAB_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> Vocabulary:
        """Read `vocab.json` from a directory (or the file itself)."""
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise InterleafError(f"vocabulary file not found: {path}")
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise InterleafError(f"vocabulary file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
