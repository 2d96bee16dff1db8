"""What a prompt is: text and images in order. A `str` is always text; an image is said so.

    pipe.generate("a red circle")                                        text
    pipe.generate([interleaf.Image("photo.png"), "what is this?"])       an image file, then text
    pipe.generate([pil_image, "what is this?"])                          a PIL image, then text
    pipe.generate(["what is this?", interleaf.END_OF_TURN])             text, then the end of a turn

A file name in a string stays text, so `["photo.png"]` would prompt with the words "photo.png";
the Python API refuses such a string when it names an existing image file (`check_text_items`),
and a bare `Path` is refused too, so the only way to put a file in a prompt is `Image(path)`.
`END_OF_TURN` is the model's end-of-turn token (Chameleon's `<reserved08706>`: transformers'
processor puts it after a prompt, Anole's scripts before an image); a model without one refuses it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from interleaf.errors import InterleafError
from interleaf.tokenizer.vocab import EndOfTurn, ImageCodes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class Image:
    """An image in a prompt: a file (path) or a PIL image."""

    source: str | os.PathLike | PIL.Image.Image

    def __post_init__(self):
        if not isinstance(self.source, (str, os.PathLike, PIL.Image.Image)):
            raise InterleafError(f"interleaf.Image takes a file path or a PIL image, got {type(self.source).__name__}")

    def segment(self) -> Path | PIL.Image.Image:
        """What the tokenizer encodes: the file's Path or the PIL image."""
        return self.source if isinstance(self.source, PIL.Image.Image) else Path(self.source)


PromptItem = str | Image | PIL.Image.Image | ImageCodes | EndOfTurn
Prompt = str | Sequence[PromptItem]


def _items(prompt: Prompt) -> list:
    return [prompt] if isinstance(prompt, (str, Image, PIL.Image.Image, ImageCodes, EndOfTurn)) else list(prompt)


def prompt_segments(prompt: Prompt) -> list[str | Path | PIL.Image.Image | ImageCodes | EndOfTurn]:
    """A prompt as the tokenizer's segments: text stays text, every image item becomes its image."""
    out = []
    for item in _items(prompt):
        if isinstance(item, Image):
            out.append(item.segment())
        elif isinstance(item, (str, PIL.Image.Image, ImageCodes, EndOfTurn)):
            out.append(item)
        elif isinstance(item, os.PathLike):
            raise InterleafError(f"a path in a prompt is not an image: write interleaf.Image({str(item)!r})")
        else:
            raise InterleafError(
                f"prompt items are text (str), interleaf.Image(path), a PIL image, ImageCodes or "
                f"interleaf.END_OF_TURN; "
                f"got {type(item).__name__}"
            )
    return out


def check_text_items(prompt: Prompt) -> None:
    """Refuse a text item that is the name of an existing image file: it was meant as the image."""
    for item in _items(prompt):
        if isinstance(item, str) and item.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(item):
            raise InterleafError(
                f"the prompt text {item!r} names an image file, and a string is always text: "
                f"write interleaf.Image({item!r}) to prompt with the image"
            )


def encode_prompt(pipe, prompt: Prompt) -> list[int]:
    """Prompt -> ids: `<bos>`, text, `<boi> codes <eoi>` per image and `<eot>` where a turn ends; no `<eos>`."""
    segments = prompt_segments(prompt)
    if any(not isinstance(s, (str, EndOfTurn)) for s in segments) and pipe.vqgan is None:
        raise InterleafError("this model directory has no VQ-GAN, so prompts cannot hold images")
    return list(pipe.tokenizer.encode(segments, bos=True, eos=False))
