"""What a generation stream yields: small dataclasses, one per thing a viewer shows.

`row` is the request's index in the batch (0 .. num-1 for `stream(..., num=N)`); `index` counts
the images of one row from 0. Concatenating a row's `TextDelta.text` between its images gives
exactly the text segments of the `Document` carried by its `Done` event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Document:
    """A generated document: text and images in order, plus the ids behind them."""

    segments: list[str | Image.Image] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)  # one (h, w) code grid per image
    token_ids: list[int] = field(default_factory=list)  # the generated ids (prompt excluded)
    prompt: list[str | Image.Image] = field(default_factory=list)

    @property
    def text(self) -> str:
        """All text segments joined."""
        return "".join(s for s in self.segments if isinstance(s, str))

    @property
    def images(self) -> list[Image.Image]:
        """The generated images, in order."""
        return [s for s in self.segments if not isinstance(s, str)]

    def add_text(self, text: str) -> None:
        """Append text, merging with a text segment just before it."""
        if not text:
            return
        if self.segments and isinstance(self.segments[-1], str):
            self.segments[-1] += text
        else:
            self.segments.append(text)


@dataclass
class TextDelta:
    """New text of row `row`: whole characters only (a multi-byte character is never split)."""

    row: int
    text: str


@dataclass
class ImageStart:
    """Row `row` began its image `index` (<boi> emitted); `tokens_total` codes will follow."""

    row: int
    index: int
    tokens_total: int


@dataclass
class ImageProgress:
    """Row `row` has `tokens_done` of `tokens_total` codes of image `index`; `preview` if asked."""

    row: int
    index: int
    tokens_done: int
    tokens_total: int
    preview: Image.Image | None = None


@dataclass
class ImageDone:
    """Image `index` of row `row` is complete (<eoi> emitted): the decoded image and its codes."""

    row: int
    index: int
    image: Image.Image
    codes: np.ndarray  # (h, w)


@dataclass
class Done:
    """Row `row` finished: token counts, wall time since the stream started, and its document."""

    row: int
    n_prompt_tokens: int
    n_generated_tokens: int
    seconds: float
    tokens_per_s: float
    document: Document


Event = TextDelta | ImageStart | ImageProgress | ImageDone | Done
