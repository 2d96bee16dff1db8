"""The per-sequence decoding state machine: what the next token may be, and what a token does.

    text mode  ──<boi>──►  image mode (exactly N codes)  ──<eoi> forced──►  text mode
        │                                                                       │
      <eos> / budget / context full  ──►  finished      ◄── image mode request ─┘

A state knows nothing of models or tensors: `allowed()` names a row of the mask table
(`logits.Allowed`) and `advance(token)` moves the state on and says what kind of token it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from interleaf.sampling.logits import Allowed
from interleaf.sampling.params import MODES
from interleaf.tokenizer.vocab import Vocabulary


@dataclass
class SequenceState:
    """Decoding state of one sequence (prompt already counted in `length`)."""

    mode: str  # "text" | "image" | "interleaved"
    tokens_per_image: int
    max_len: int  # the whole sequence (prompt + generated) never exceeds this
    max_new_tokens: int
    max_images: int = 1
    length: int = 0  # tokens in the sequence so far, prompt included
    n_generated: int = 0
    n_images: int = 0  # images completed
    in_image: bool = False
    codes_done: int = 0  # codes of the current image
    finished: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        self._check_budget()

    @property
    def image_cost(self) -> int:
        """Tokens a whole image takes: <boi>, its codes, <eoi>."""
        return self.tokens_per_image + 2

    def can_start_image(self) -> bool:
        """Room left (context and budget) for a whole image, and an image still allowed."""
        room = min(self.max_len - self.length, self.max_new_tokens - self.n_generated)
        limit = 1 if self.mode == "image" else self.max_images
        return self.mode != "text" and self.n_images < limit and room >= self.image_cost

    def allowed(self) -> Allowed:
        """The set the next token must come from."""
        if self.finished:
            raise RuntimeError("allowed() called on a finished sequence")
        if self.in_image:
            return Allowed.IMAGE if self.codes_done < self.tokens_per_image else Allowed.EOI
        if self.mode == "image":
            return Allowed.BOI
        return Allowed.TEXT_OR_IMAGE if self.can_start_image() else Allowed.TEXT

    def advance(self, token: int, vocab: Vocabulary) -> str:
        """Take `token`; return its kind: "text", "eos", "boi", "code" or "eoi"."""
        kind = self._classify(token, vocab)
        self.length += 1
        self.n_generated += 1
        if kind == "boi":
            self.in_image, self.codes_done = True, 0
        elif kind == "code":
            self.codes_done += 1
        elif kind == "eoi":
            self.in_image = False
            self.n_images += 1
            self.finished = self.mode == "image"
        elif kind == "eos":
            self.finished = True
        self._check_budget()
        return kind

    def _classify(self, token: int, vocab: Vocabulary) -> str:
        allowed = self.allowed()
        if allowed == Allowed.IMAGE and vocab.is_image(token):
            return "code"
        if token == vocab.eoi_id and allowed == Allowed.EOI:
            return "eoi"
        if token == vocab.boi_id and allowed in (Allowed.BOI, Allowed.TEXT_OR_IMAGE):
            return "boi"
        if token == vocab.eos_id and allowed in (Allowed.TEXT, Allowed.TEXT_OR_IMAGE):
            return "eos"
        if vocab.is_text(token) and allowed in (Allowed.TEXT, Allowed.TEXT_OR_IMAGE):
            return "text"
        raise RuntimeError(f"token {token} is not allowed in state {allowed.name}")

    def _check_budget(self) -> None:
        # an image, once started, always fits (it only starts with room for all of it)
        if not self.in_image and (self.length >= self.max_len or self.n_generated >= self.max_new_tokens):
            self.finished = True
        if self.mode == "image" and not self.in_image and self.n_images == 0 and not self.can_start_image():
            self.finished = True
