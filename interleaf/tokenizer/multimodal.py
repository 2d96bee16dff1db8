"""Documents of text and images <-> one stream of model ids.

Text goes through the BPE `TextTokenizer`, images through the VQ-GAN (`load_image` at the
VQ-GAN's resolution, then `VQModel.encode`), and the shared `Vocabulary` lays them out as
`<bos> text <boi> codes <eoi> text ... <eos>`. Images already tokenized (`ImageCodes`) skip the
VQ-GAN, so a tokenizer without one still handles pre-tokenized data.

A prompt written as text (the CLI's, the viewer's) marks where an image goes with `<image>` and the
end of a turn with `<eot>` (`parse_prompt_text`); the Python API says both with items instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from interleaf.errors import InterleafError
from interleaf.tokenizer.image import load_image, to_pil
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import (
    END_OF_TURN,
    END_OF_TURN_NAME,
    DecodedDocument,
    EndOfTurn,
    ImageCodes,
    Segment,
    Vocabulary,
)

DocumentSegment = str | Image.Image | Path | ImageCodes | EndOfTurn
IMAGE_BATCH = 16  # images per VQ-GAN call
IMAGE_MARKER = "<image>"  # where an image goes in a prompt's text
END_OF_TURN_MARKER = END_OF_TURN_NAME  # where a turn ends in a prompt's text: "<eot>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(END_OF_TURN_MARKER)})")


class MarkerCountError(InterleafError):
    """The prompt's image markers and its images do not pair up; the counts are attributes."""

    def __init__(self, markers: int, images: int, marker: str = IMAGE_MARKER):
        super().__init__(f"the prompt has {markers} {marker} markers but {images} images")
        self.markers, self.images, self.marker = markers, images, marker


def parse_prompt_text(text: str, images: Sequence) -> list:
    """The items of a prompt written as text (the CLI's, the viewer's): each `<image>` takes the next
    image (without any, the images come first) and each `<eot>` is END_OF_TURN."""
    pieces = _MARKERS.split(text)  # text, marker, text, marker, ..., text
    n_markers = pieces[1::2].count(IMAGE_MARKER)
    if n_markers and n_markers != len(images):
        raise MarkerCountError(n_markers, len(images))
    placed = iter(images)
    items: list = [] if n_markers else list(images)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            items.append(piece)
        else:
            items.append(next(placed) if piece == IMAGE_MARKER else END_OF_TURN)
    return [s for s in items if not (isinstance(s, str) and not s)]


class MultimodalTokenizer:
    """Encode interleaved documents to ids and decode ids back to text and images."""

    def __init__(self, vocab: Vocabulary, text: TextTokenizer, vqgan=None):
        if text.vocab_size > vocab.n_text:  # ids from n_text on are image codes (or padding)
            raise InterleafError(
                f"text tokenizer has {text.vocab_size} ids but the vocabulary has room for {vocab.n_text} text ids"
            )
        if vqgan is not None:
            if tuple(vqgan.grid) != tuple(vocab.image_grid):
                raise InterleafError(
                    f"VQ-GAN makes {vqgan.grid[0]}x{vqgan.grid[1]} code grids, the vocabulary expects "
                    f"{vocab.image_grid[0]}x{vocab.image_grid[1]}"
                )
            if vqgan.config.n_embed != vocab.n_codes:
                raise InterleafError(f"VQ-GAN has {vqgan.config.n_embed} codes, the vocabulary {vocab.n_codes}")
        self.vocab = vocab
        self.text = text
        self.vqgan = vqgan

    # ---- images --------------------------------------------------------------------------
    def _require_vqgan(self, what: str):
        if self.vqgan is None:
            raise InterleafError(f"{what} needs a VQ-GAN, and this tokenizer has none")
        return self.vqgan

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image | str | os.PathLike]) -> list[ImageCodes]:
        """Images (PIL or paths) -> code grids, batched through the VQ-GAN."""
        if not images:
            return []
        vqgan = self._require_vqgan("encoding an image")
        resolution = vqgan.config.resolution
        out: list[ImageCodes] = []
        for start in range(0, len(images), IMAGE_BATCH):
            batch = torch.stack([load_image(im, resolution) for im in images[start : start + IMAGE_BATCH]])
            codes = vqgan.encode(batch)  # (B, h, w)
            out.extend(ImageCodes(c) for c in codes.cpu().numpy())
        return out

    @torch.inference_mode()
    def decode_images(self, codes: Sequence[ImageCodes]) -> list[Image.Image]:
        """Code grids -> RGB images through the VQ-GAN decoder."""
        if not codes:
            return []
        vqgan = self._require_vqgan("drawing an image")
        out: list[Image.Image] = []
        for start in range(0, len(codes), IMAGE_BATCH):
            grid = torch.from_numpy(np.stack([c.codes for c in codes[start : start + IMAGE_BATCH]]))
            out.extend(to_pil(x) for x in vqgan.decode_code(grid))  # (B, 3, R, R)
        return out

    # ---- documents -----------------------------------------------------------------------
    def segments(self, doc: Sequence[DocumentSegment] | str) -> list[Segment]:
        """A document with every image (PIL or path) replaced by its ImageCodes."""
        if isinstance(doc, str):
            return [doc]
        images = []
        for i, seg in enumerate(doc):
            if isinstance(seg, (Image.Image, os.PathLike)):
                images.append(i)
            elif not isinstance(seg, (str, ImageCodes, EndOfTurn)):
                raise InterleafError(
                    f"segment {i}: expected text, an image (PIL or Path), ImageCodes or END_OF_TURN, "
                    f"got {type(seg).__name__}"
                )
        codes = dict(zip(images, self.encode_images([doc[i] for i in images])))
        return [codes.get(i, seg) for i, seg in enumerate(doc)]

    def encode(self, doc: Sequence[DocumentSegment] | str, bos: bool = True, eos: bool = True) -> list[int]:
        """Document -> model ids: `<bos>`, text tokens, `<boi> codes <eoi>` per image, `<eot>`, `<eos>`."""
        return self.vocab.encode_document(self.segments(doc), self.text.encode, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> DecodedDocument:
        """Model ids -> text and ImageCodes segments, with any problems of a malformed stream."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.vocab.decode_document(list(ids), self.text.decode)

    def to_images(self, segments: Sequence[Segment | Image.Image]) -> list[str | Image.Image]:
        """Segments with every ImageCodes drawn by the VQ-GAN decoder (text and PIL images kept)."""
        at = [i for i, seg in enumerate(segments) if isinstance(seg, ImageCodes)]
        drawn = dict(zip(at, self.decode_images([segments[i] for i in at])))
        return [drawn.get(i, seg) for i, seg in enumerate(segments)]
