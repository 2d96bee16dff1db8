"""Write generated documents to a directory: `document.md`, `document.html` and the PNGs.

Every file is written atomically (temp file + rename), so an interrupted run leaves each file
either complete or absent. The HTML embeds its images as data URIs: it is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from interleaf.sampling.events import Document
from interleaf.tokenizer.vocab import END_OF_TURN_NAME, EndOfTurn
from interleaf.utils import atomic_path, atomic_write

MARKDOWN_FILE = "document.md"
HTML_FILE = "document.html"


@dataclass
class Rendered:
    """Paths written by `write_documents`."""

    markdown: Path
    html: Path
    images: list[Path]


def _as_image(segment) -> Image.Image | None:
    if isinstance(segment, Image.Image):
        return segment
    if isinstance(segment, Path):
        with Image.open(segment) as im:
            return im.convert("RGB")
    return None


def save_png(image: Image.Image, path: Path) -> Path:
    """Write one PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _blocks(documents: Sequence[Document], out_dir: Path, written: list[Path]) -> list[tuple[str, object]]:
    """Flatten prompt + documents into ("heading"|"text"|"image", payload) blocks; save the PNGs."""
    blocks: list[tuple[str, object]] = []
    prompt = documents[0].prompt if documents else []
    if prompt:
        blocks.append(("heading", "Prompt"))
        for i, seg in enumerate(prompt):
            image = _as_image(seg)
            if image is None:
                shown = END_OF_TURN_NAME if isinstance(seg, EndOfTurn) else "[tokenized image]"
                blocks.append(("text", seg if isinstance(seg, str) else shown))
            else:
                written.append(save_png(image, out_dir / f"prompt-{i}.png"))
                blocks.append(("image", (image, written[-1].name)))
    for d, doc in enumerate(documents):
        blocks.append(("heading", f"Sample {d + 1}" if len(documents) > 1 else "Output"))
        n_image = 0
        for seg in doc.segments:
            if isinstance(seg, str):
                blocks.append(("text", seg))
            else:
                written.append(save_png(seg, out_dir / f"image-{d}-{n_image}.png"))
                blocks.append(("image", (seg, written[-1].name)))
                n_image += 1
    return blocks


# CommonMark syntax that can stand anywhere in a line: escapes, code, emphasis, links and images,
# raw HTML and entities, and the GFM extras (table pipes, ~~strikethrough~~)
_INLINE_SYNTAX = re.compile(r"[\\`*_\[\]<&|~]")


def escape_markdown(text: str) -> str:
    """`text` as Markdown that a CommonMark renderer shows literally: a line break stays one (a
    backslash ends the line, as the HTML's pre-wrap shows it), a blank line separates paragraphs."""
    lines = [_escape_line(line) for line in re.split(r"\r\n|\r|\n", text)]
    return "\n".join(line + "\\" if line and after else line for line, after in zip(lines, lines[1:] + [""]))


def _escape_line(line: str) -> str:
    if not line.strip(" \t"):
        return ""  # a blank line separates paragraphs, as before
    line = _INLINE_SYNTAX.sub(r"\\\g<0>", line)
    line = re.sub(r"^([#+=>-])", r"\\\1", line)  # headings, lists, quotes, rules, setext underlines
    line = re.sub(r"^(\d+)([.)])", r"\1\\\2", line)  # ordered lists: "1." and "1)"
    # CommonMark drops spaces at the ends of a line, reads 4 leading as a code block and 2 trailing as
    # a hard break: the outermost space or tab becomes a character reference, which keeps them all
    return re.sub(r"^[ \t]|[ \t]$", lambda m: f"&#{ord(m[0])};", line)


def to_markdown(blocks: list[tuple[str, object]]) -> str:
    """Markdown text, prompt and generated text escaped; images linked by file name."""
    lines = ["# interleaf", ""]
    for kind, payload in blocks:
        if kind == "heading":
            lines += [f"## {payload}", ""]
        elif kind == "text":
            lines += [escape_markdown(str(payload)), ""]
        else:
            _, name = payload
            lines += [f"![{name}]({name})", ""]
    return "\n".join(lines)


def to_html(blocks: list[tuple[str, object]]) -> str:
    """Standalone HTML; images inline as data URIs."""
    body = []
    for kind, payload in blocks:
        if kind == "heading":
            body.append(f"<h2>{html.escape(str(payload))}</h2>")
        elif kind == "text":
            body.append(f'<p class="text">{html.escape(str(payload))}</p>')
        else:
            image, name = payload
            body.append(
                f'<figure><img src="{_data_uri(image)}" alt="{html.escape(name)}" '
                f'width="{max(image.width, 256)}"><figcaption>{html.escape(name)}</figcaption></figure>'
            )
    style = (
        "body{font-family:sans-serif;max-width:48em;margin:2em auto}"
        ".text{white-space:pre-wrap}img{image-rendering:pixelated}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>interleaf</title>'
        f"<style>{style}</style></head>\n<body>\n<h1>interleaf</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_documents(out_dir: str | Path, documents: Sequence[Document]) -> Rendered:
    """Write the PNGs, then `document.md` and `document.html`, into `out_dir`; return the paths.

    When `out_dir` holds earlier documents (a document.md), their PNGs that are not written
    again (prompt-*.png, image-*-*.png) are removed, so the folder holds one set of documents.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = (out_dir / MARKDOWN_FILE).is_file()
    images: list[Path] = []
    blocks = _blocks(documents, out_dir, images)
    md_path, html_path = out_dir / MARKDOWN_FILE, out_dir / HTML_FILE
    with atomic_write(md_path, encoding="utf-8") as f:
        f.write(to_markdown(blocks))
    with atomic_write(html_path, encoding="utf-8") as f:
        f.write(to_html(blocks))
    for old in [*out_dir.glob("prompt-*.png"), *out_dir.glob("image-*-*.png")] if earlier else []:
        if old not in images and old.is_file():
            old.unlink()
    return Rendered(md_path, html_path, images)
