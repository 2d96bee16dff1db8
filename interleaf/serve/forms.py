"""What a `/api/generate` request may hold, and how it becomes a prompt and its SamplingParams.

The body is multipart/form-data (text fields and `image` uploads), urlencoded or JSON (text
prompts only), read by Starlette's parsers (python-multipart underneath). Every field is a
sampling option (params.py: its range is the option's), `prompt` or `image`.

The limits are this server's policy (`ServeLimits`): the body's size (counted as it arrives),
the number of uploads and fields and a text field's size (Starlette's `max_files`, `max_fields`,
`max_part_size`), an upload's bytes and pixels, the prompt's length, and the tokens and images
one request may ask for. Uploads are decoded as images or refused; nothing from a request names
a file on this machine (Starlette spools an upload in memory, past 1 MB in an anonymous temp file).
"""

from __future__ import annotations

import io
import json
import secrets
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from interleaf.sampling.params import OPTIONS, OptionError, SamplingParams
from interleaf.tokenizer.multimodal import MarkerCountError, parse_prompt_text

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORM_FIELDS = ("prompt", "image", *OPTIONS)
SERVER_OPTIONS = {"mode": "interleaved"}  # the viewer writes documents unless asked otherwise


@dataclass
class ServeLimits:
    """What one request may ask for; anything beyond is refused with a 4xx and a clear message."""

    max_prompt_chars: int = 4000
    max_uploads: int = 4  # images per request
    max_upload_bytes: int = 8 << 20  # per image, encoded
    max_image_side: int = 4096  # pixels, either side, decoded
    max_queue: int = 8  # requests running or waiting; one more gets 503
    max_new_tokens: int = 4096
    max_images: int = 4  # images one request may generate

    @property
    def max_body_bytes(self) -> int:
        """Whole request body: the uploads plus room for the form fields."""
        return self.max_uploads * self.max_upload_bytes + 4 * self.max_prompt_chars + (64 << 10)

    @property
    def max_field_bytes(self) -> int:
        """One text field: the prompt, UTF-8 (up to 4 bytes a character)."""
        return 4 * self.max_prompt_chars + 1024


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One uploaded file, held in memory; `name` is only ever shown, never used as a path."""

    name: str
    data: bytes


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.0f} KB"


def _display_name(filename: str | None) -> str:
    """A client's file name reduced to something safe to print (last path part, printable)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:80]
    return name or "upload"


# ---- the body ---------------------------------------------------------------------------------


async def limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body's chunks, refused with 413 once it grows past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {_mb(int(declared))} is over the limit of {_mb(limit)}")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {_mb(limit)}")
        yield chunk


class _Multipart(MultiPartParser):
    """Starlette's multipart parser, noting whether the body reached its closing boundary (a body
    cut short would otherwise read as the parts before the cut, an upload quietly missing)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


async def read_fields(request: Request, limits: ServeLimits) -> tuple[dict[str, Any], list[Upload]]:
    """The request's fields by name and its uploads in order; unknown fields are refused."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    body = limited(request, limits.max_body_bytes)
    if content_type == b"application/json":
        fields, uploads = parse_json(b"".join([chunk async for chunk in body])), []
    elif content_type == b"multipart/form-data":
        parser = _Multipart(request.headers, body, max_files=limits.max_uploads, **_form_limits(limits))
        fields, uploads = await _read_form(parser)
    elif content_type == b"application/x-www-form-urlencoded":
        fields, uploads = await _read_form(FormParser(request.headers, body, **_form_limits(limits)))
    else:
        raise RequestError(415, "send the request as multipart/form-data, urlencoded or JSON")
    unknown = [name for name in fields if name not in FORM_FIELDS]
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r}")
    return fields, uploads


def _form_limits(limits: ServeLimits) -> dict:
    return {"max_fields": len(FORM_FIELDS), "max_part_size": limits.max_field_bytes}


async def _read_form(parser: FormParser | _Multipart) -> tuple[dict[str, Any], list[Upload]]:
    """Text fields by name and the `image` uploads (read into memory) of a parsed form."""
    try:
        form = await parser.parse()
    except MultiPartException as e:  # a limit of Starlette's, or a body python-multipart cannot read
        raise RequestError(400, f"form refused: {e.message}") from None
    try:
        if isinstance(parser, _Multipart) and not parser.complete:
            raise RequestError(400, "malformed multipart body: it stops before its closing boundary")
        fields: dict[str, Any] = {}
        uploads: list[Upload] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile) != (name == "image"):
                raise RequestError(400, f"form field {name[:40]!r} must be {'a file' if name == 'image' else 'text'}")
            if isinstance(value, UploadFile):
                if value.size:  # an empty file input sends an empty part: no image
                    uploads.append(Upload(_display_name(value.filename), await value.read()))
            else:
                fields[name] = value
        return fields, uploads
    finally:
        await form.close()


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON body: a mapping of the same fields as the form (text prompts only)."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    except (RecursionError, ValueError) as e:  # nested too deep, or an integer of thousands of digits
        raise RequestError(400, f"JSON body not accepted: {str(e)[:80]}") from None
    if not isinstance(fields, dict):
        raise RequestError(400, "the JSON body must be an object of fields")
    if "image" in fields:
        raise RequestError(400, "send images as multipart/form-data, not in JSON")
    return fields


# ---- options, images, the prompt ---------------------------------------------------------------


def parse_options(fields: dict[str, Any], pipe, limits: ServeLimits, preview_every: int) -> SamplingParams:
    """The request's SamplingParams: its fields over the server's defaults over the model's.

    A blank field means the default; a request without a seed gets a random one (reported back
    in the `start` event, so any result can be reproduced).
    """
    given = {k: v for k, v in fields.items() if k in OPTIONS and not (isinstance(v, str) and not v.strip())}
    own = {**SERVER_OPTIONS, "preview_every": preview_every, "seed": secrets.randbelow(2**31)}
    try:
        params = pipe.sampling_params(**{**own, **given})
    except OptionError as e:
        raise RequestError(400, str(e)) from None
    for name, most in (("max_new_tokens", limits.max_new_tokens), ("max_images", limits.max_images)):
        value = getattr(params, name)
        if value is not None and value > most:
            raise RequestError(400, f"{name} must be at most {most} on this server, got {value}")
    return params


def decode_upload(upload: Upload, limits: ServeLimits) -> Image.Image:
    """Decode an upload as an image (in memory) within the size limits, or refuse it."""
    if len(upload.data) > limits.max_upload_bytes:
        raise RequestError(
            413, f"upload {upload.name!r} is {_mb(len(upload.data))}; the limit is {_mb(limits.max_upload_bytes)}"
        )
    accepted = ", ".join(IMAGE_FORMATS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(upload.data), formats=IMAGE_FORMATS)
        except Exception:
            raise RequestError(415, f"upload {upload.name!r} is not an image (accepted: {accepted})") from None
        w, h = img.size
        if max(w, h) > limits.max_image_side or min(w, h) < 1:
            raise RequestError(
                413, f"upload {upload.name!r} is {w}x{h} pixels; the limit is {limits.max_image_side} on either side"
            )
        try:
            img.load()
            return img.convert("RGB")
        except Exception as e:
            raise RequestError(400, f"upload {upload.name!r} is a damaged {img.format} image: {e}") from None


def build_prompt(text: Any, images: list[Image.Image], limits: ServeLimits) -> list:
    """Prompt segments: each `<image>` in the text takes the next upload (else images come first),
    each `<eot>` ends a turn."""
    if not isinstance(text, str):
        raise RequestError(400, "prompt must be text")
    if len(text) > limits.max_prompt_chars:
        raise RequestError(413, f"prompt is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    try:
        segments = parse_prompt_text(text, images)
    except MarkerCountError as e:
        raise RequestError(
            400, f"the prompt has {e.markers} {e.marker} markers but {e.images} images were uploaded"
        ) from None
    if not segments:
        raise RequestError(400, "the prompt is empty: write some text or upload an image")
    return segments


def prompt_and_options(fields: dict[str, Any], uploads: list[Upload], pipe, limits: ServeLimits, preview_every: int):
    """(prompt segments, SamplingParams) of a request's fields and uploads (decoding takes CPU time)."""
    params = parse_options(fields, pipe, limits, preview_every)
    images = [decode_upload(u, limits) for u in uploads]
    return build_prompt(fields.get("prompt", ""), images, limits), params
