"""The web viewer's server: one page, and an API that streams the sampler's events.

    GET  /                       the page (static/index.html; app.js and style.css beside it)
    GET  /health                 {"status": "ok", "queued": n, "running": bool}
    GET  /api/model              the model's description, the request limits and the defaults
    POST /api/generate           multipart form (or JSON): prompt, options, `image` uploads;
                                 answers text/event-stream: queued, start, text, image_start,
                                 image_progress, image_done, done | cancelled | error
    POST /api/jobs/{id}/cancel   stop a queued or running request; its slot is freed at once

One worker thread owns the model and runs requests one at a time through `pipe.stream(...)`;
a cancel flag is checked between events and closing the sampler's generator stops the decode.
A request whose client goes away is cancelled the same way.

Safety: the command binds to loopback unless told otherwise, and then only answers Host names
of this machine (no DNS rebinding); prompts, uploads, image sizes and the queue are bounded;
uploads are decoded as images in memory or refused; nothing from a request names a file.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import inspect
import io
import json
import math
import secrets
import threading
import time
import urllib.parse
import warnings
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from interleaf.errors import InterleafError
from interleaf.sampling.events import Done, ImageDone, ImageProgress, ImageStart, TextDelta
from interleaf.tokenizer.multimodal import MarkerCountError, place_images
from interleaf.utils import get_logger

log = get_logger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MODES = ("text", "image", "interleaved")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
KEEPALIVE_S = 10.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


# ---- limits and options -------------------------------------------------------------------


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


@dataclass
class GenerateOptions:
    """The sampling options a request may set (those of the CLI); None = the sampler's default."""

    mode: str = "interleaved"
    max_new_tokens: int | None = None
    max_images: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    preview_every: int | None = None

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for `pipe.stream`: only what the request (or server) set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


# name -> (type, lowest, highest); the upper bounds that depend on the server come from limits
OPTION_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 10.0),
    "top_k": (int, 0, 1 << 20),
    "top_p": (float, 0.0, 1.0),
    "cfg_scale": (float, 0.0, 50.0),
    "seed": (int, 0, 2**63 - 1),
    "preview_every": (int, 0, 1 << 20),
}
FORM_FIELDS = {"prompt", "image", *(f.name for f in fields(GenerateOptions))}


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sampler_defaults(pipe=None) -> dict:
    """The defaults of the options the page shows: the model's sampling.yaml over the sampler's own
    (so page = CLI = library)."""
    try:
        from interleaf.sampling.generate import stream
    except ImportError:
        return {}
    names = {f.name for f in fields(GenerateOptions)}
    params = inspect.signature(stream).parameters.values()
    own = {p.name: p.default for p in params if p.name in names and p.default is not inspect.Parameter.empty}
    model = getattr(pipe, "sampling_defaults", {})
    shown = {k: v for k, v in model.items() if k in names and OPTION_RANGES[k][1] <= v <= OPTION_RANGES[k][2]}
    return {**own, **shown}  # a value the page could not send back keeps the sampler's own


def _number(name: str, raw: Any, kind: type, lo: float, hi: float):
    """Parse one numeric option from a form string or JSON value, inside [lo, hi]."""
    what = "an integer" if kind is int else "a number"
    value = None
    if not isinstance(raw, bool):
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            value = kind(raw.strip()) if isinstance(raw, str) else kind(raw)
            if kind is int and isinstance(raw, float) and raw != value:
                value = None
    if value is None or (kind is float and not math.isfinite(value)) or not lo <= value <= hi:
        shown = str(raw)[:40]
        raise RequestError(400, f"{name} must be {what} between {lo:g} and {hi:g}, got {shown!r}")
    return value


def parse_options(form: dict[str, Any], limits: ServeLimits, preview_every: int) -> GenerateOptions:
    """Validate the request's sampling options; a blank field means the default."""
    ranges = dict(OPTION_RANGES)
    ranges["max_new_tokens"] = (int, 1, limits.max_new_tokens)
    ranges["max_images"] = (int, 0, limits.max_images)
    opts = GenerateOptions(preview_every=preview_every or None)
    mode = str(form.get("mode") or "interleaved").strip()
    if mode not in MODES:
        raise RequestError(400, f"mode must be one of {', '.join(MODES)}, got {mode[:40]!r}")
    opts.mode = mode
    for name, (kind, lo, hi) in ranges.items():
        raw = form.get(name)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            continue
        setattr(opts, name, _number(name, raw, kind, lo, hi))
    if opts.top_p is not None and opts.top_p <= 0:
        raise RequestError(400, "top_p must be above 0 (1 keeps every token)")
    if opts.seed is None:  # a seed is always reported back, so any result can be reproduced
        opts.seed = secrets.randbelow(2**31)
    return opts


# ---- request bodies, uploads and prompts ---------------------------------------------------


@dataclass
class Upload:
    """One uploaded file, held in memory; `name` is only ever shown, never used as a path."""

    name: str
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {_mb(int(declared))} is over the limit of {_mb(limit)}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {_mb(limit)}")
    return bytes(body)


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n / 1024:.0f} KB"


def _display_name(filename: str | None) -> str:
    """A client's file name reduced to something safe to print (last path part, printable)."""
    name = (filename or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:80]
    return name or "upload"


def parse_multipart(body: bytes, content_type: str, limits: ServeLimits) -> tuple[dict[str, str], list[Upload]]:
    """Split a multipart/form-data body in memory into text fields and file uploads."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart body without a boundary")
    parts: list[dict] = []
    header: dict = {"field": b"", "value": b""}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_part_data(data, start, end):
        part = parts[-1]
        part["data"] += data[start:end]
        if len(part["data"]) > limits.max_upload_bytes:  # stop reading it: say which one
            _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
            filename = disp.get(b"filename")
            what = f"upload {_display_name(filename.decode('utf-8', 'replace'))!r}" if filename else "a form field"
            raise RequestError(413, f"{what} is over the limit of {_mb(limits.max_upload_bytes)}")

    def on_end():
        header["ended"] = True

    callbacks = dict(
        on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
        on_header_end=on_header_end, on_part_data=on_part_data, on_end=on_end,
    )  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart raises its own errors (and ValueError) on bad bodies
        raise RequestError(400, f"malformed multipart body: {e}") from None
    if not header.get("ended"):
        raise RequestError(400, "malformed multipart body: it stops before its closing boundary")
    return _collect_parts(parts, limits)


def _collect_parts(parts: list[dict], limits: ServeLimits) -> tuple[dict[str, str], list[Upload]]:
    """Form fields by name, and the uploads of the `image` field in order."""
    form: dict[str, str] = {}
    uploads: list[Upload] = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise RequestError(400, f"unknown form field {name[:40]!r}")
        if name == "image":
            filename = disp.get(b"filename")
            display = _display_name(filename.decode("utf-8", "replace") if filename else None)
            if part["data"]:  # an empty file input sends an empty part: no image
                uploads.append(Upload(display, bytes(part["data"])))
            if len(uploads) > limits.max_uploads:
                raise RequestError(413, f"at most {limits.max_uploads} images per request")
            continue
        try:
            form[name] = part["data"].decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, f"form field {name!r} is not UTF-8 text") from None
    return form, uploads


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON body: a mapping of the same fields as the form (text prompts only)."""
    try:
        form = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"malformed JSON body: {e}") from None
    except (RecursionError, ValueError) as e:  # nested too deep, or an integer of thousands of digits
        raise RequestError(400, f"JSON body not accepted: {str(e)[:80]}") from None
    if not isinstance(form, dict):
        raise RequestError(400, "the JSON body must be an object of fields")
    if "image" in form:
        raise RequestError(400, "send images as multipart/form-data, not in JSON")
    unknown = sorted(set(form) - FORM_FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r}")
    return form


def parse_urlencoded(body: bytes) -> dict[str, str]:
    """An urlencoded form body (text prompts only)."""
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"malformed form body: {e}") from None
    form = dict(pairs)
    unknown = sorted(set(form) - FORM_FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r}")
    return form


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


def parse_request(
    body: bytes, content_type: str, limits: ServeLimits, preview_every: int
) -> tuple[list, GenerateOptions]:
    """A /api/generate body -> (prompt segments, options), or a RequestError saying what is wrong."""
    if content_type.startswith("multipart/form-data"):
        form, uploads = parse_multipart(body, content_type, limits)
    elif content_type.startswith("application/json"):
        form, uploads = parse_json(body), []
    elif content_type.startswith("application/x-www-form-urlencoded"):
        form, uploads = parse_urlencoded(body), []
    else:
        raise RequestError(415, "send the request as multipart/form-data, urlencoded or JSON")
    options = parse_options(form, limits, preview_every)
    images = [decode_upload(u, limits) for u in uploads]
    return build_prompt(form.get("prompt", ""), images, limits), options


def build_prompt(text: str, images: list[Image.Image], limits: ServeLimits) -> list:
    """Prompt segments: each `<image>` in the text takes the next upload; else images come first."""
    if not isinstance(text, str):
        raise RequestError(400, "prompt must be text")
    if len(text) > limits.max_prompt_chars:
        raise RequestError(413, f"prompt is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    try:
        segments = place_images(text, images)
    except MarkerCountError as e:
        raise RequestError(
            400, f"the prompt has {e.markers} {e.marker} markers but {e.images} images were uploaded"
        ) from None
    if not segments:
        raise RequestError(400, "the prompt is empty: write some text or upload an image")
    return segments


# ---- events ---------------------------------------------------------------------------------


def data_url(img: Image.Image) -> str:
    """A PNG data URL of an image (what the page shows, and what the download embeds)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def event_message(event) -> tuple[str, dict]:
    """One sampler event as (SSE event name, JSON-able data)."""
    if isinstance(event, TextDelta):
        return "text", {"text": event.text}
    if isinstance(event, ImageStart):
        return "image_start", {"index": event.index, "tokens_total": event.tokens_total}
    if isinstance(event, ImageProgress):
        preview = data_url(event.preview) if event.preview is not None else None
        data = {"index": event.index, "tokens_done": event.tokens_done, "tokens_total": event.tokens_total}
        return "image_progress", {**data, "preview": preview}
    if isinstance(event, ImageDone):
        w, h = event.image.size
        return "image_done", {"index": event.index, "image": data_url(event.image), "width": w, "height": h}
    if isinstance(event, Done):
        return "done", {
            "n_prompt_tokens": event.n_prompt_tokens,
            "n_generated_tokens": event.n_generated_tokens,
            "seconds": round(event.seconds, 4),
            "tokens_per_s": round(event.tokens_per_s, 2),
        }
    raise TypeError(f"unknown sampler event {type(event).__name__}")


def sse(name: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# ---- the queue and the worker that owns the model -------------------------------------------


class Job:
    """One request: its prompt and options, a cancel flag, and the stream of its messages."""

    def __init__(self, prompt: list, options: GenerateOptions, loop: asyncio.AbstractEventLoop):
        self.id = secrets.token_hex(8)
        self.prompt = prompt
        self.options = options
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.messages: asyncio.Queue = asyncio.Queue()
        self._loop = loop

    def emit(self, name: str, data: dict) -> None:
        """Hand one message to the request's stream (from any thread)."""
        self._put((name, {"id": self.id, **data}))

    def end(self) -> None:
        """Close the request's stream (from any thread)."""
        self._put(None)

    def _put(self, message) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self.messages.put_nowait, message)


class Worker:
    """The one thread that owns the model: runs queued requests one at a time, in order."""

    def __init__(self, pipe, max_queue: int):
        self.pipe = pipe
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from the server's event loop --
    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._serve_forever, name="interleaf-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything queued or running and wait for the thread to end."""
        with self._cond:
            self._stopping = True
            for job in list(self._pending):
                self._drop_pending(job)
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a request (its first message says where it stands) or refuse it with 503."""
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            busy = len(self._pending) + (self._running is not None)
            if busy >= self.max_queue:
                raise RequestError(503, f"the queue is full ({busy} requests); try again in a moment")
            self._pending.append(job)
            self._announce(job, len(self._pending))
            self._cond.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Stop a queued or running request; False if no such request is queued or running."""
        with self._cond:
            if self._running is not None and self._running.id == job_id:
                self._running.cancelled.set()
                return True
            for i, job in enumerate(self._pending):
                if job.id == job_id:
                    self._drop_pending(job)
                    for j in range(i, len(self._pending)):  # only those behind it moved up
                        self._announce(self._pending[j], j + 1)
                    return True
        return False

    def status(self) -> dict:
        """How busy the worker is."""
        with self._cond:
            return {"queued": len(self._pending), "running": self._running is not None}

    # -- helpers, called with the lock held --
    def _announce(self, job: Job, position: int) -> None:
        ahead = position - 1 + (self._running is not None)
        job.emit("queued", {"position": position, "ahead": ahead})

    def _drop_pending(self, job: Job) -> None:
        self._pending.remove(job)
        job.cancelled.set()
        job.emit("cancelled", {"while": "queued"})
        job.end()

    # -- the worker thread --
    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._running = self._pending.popleft()
                for i, other in enumerate(self._pending):
                    self._announce(other, i + 1)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running = None
                job.end()

    def _run(self, job: Job) -> None:
        """Stream one request's events; stop between two events once it is cancelled."""
        waited = time.perf_counter() - job.submitted
        job.emit("start", {"seed": job.options.seed, "queue_seconds": round(waited, 4)})
        events = None
        try:
            events = self.pipe.stream(job.prompt, **job.options.sampler_kwargs())
            for event in events:
                if job.cancelled.is_set():
                    job.emit("cancelled", {"while": "running"})
                    return
                name, data = event_message(event)
                if name == "done":
                    data["queue_seconds"] = round(waited, 4)
                job.emit(name, data)
        except InterleafError as e:
            job.emit("error", {"message": str(e)})
        except Exception as e:  # a bug must not take the server down: report it, keep serving
            log.exception("request %s failed", job.id)
            job.emit("error", {"message": f"internal error: {type(e).__name__}: {e}"})
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()  # GeneratorExit inside the sampler: the decode stops here


# ---- the model's description -----------------------------------------------------------------


def describe_model(pipe, name: str) -> dict:
    """What the page shows about the model: size, vocabulary, images."""
    model, vocab, vqgan = pipe.model, pipe.vocab, getattr(pipe, "vqgan", None)
    n_params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters(), None)
    info = {
        "name": name,
        "parameters": n_params,
        "parameters_human": _human(n_params),
        "vocab_size": vocab.size,
        "n_text_tokens": vocab.n_text,
        "n_image_codes": vocab.n_codes,
        "tokens_per_image": vocab.tokens_per_image,
        "image_grid": list(vocab.image_grid),
        "device": str(first.device) if first is not None else "cpu",
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else "",
        "can_draw": vqgan is not None and getattr(vqgan.config, "has_decoder", True),
    }
    args = getattr(model, "args", None)
    for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
        if hasattr(args, key):
            info[key] = getattr(args, key)
    if vqgan is not None:
        info["image_resolution"] = getattr(vqgan.config, "resolution", None)
    return info


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# ---- the app ----------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 as JSON like every other refusal."""
    return _error(exc.status_code, exc.detail, exc.headers)


def _check_origin(request: Request) -> None:
    """Browsers name the page's origin on POST: only this server's own pages may post here."""
    origin = request.headers.get("origin")
    if origin and origin.split("://", 1)[-1].lower() != request.headers.get("host", "").lower():
        raise RequestError(403, "cross-origin requests are not accepted")


def _host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """Is the Host header (name[:port], [v6]:port) one of `allowed`?"""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return host in allowed


def create_app(
    pipe,
    limits: ServeLimits | None = None,
    model_name: str = "model",
    preview_every: int = 0,
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
) -> Starlette:
    """The viewer app for a loaded pipeline. `allowed_hosts=None` answers any Host header."""
    limits = limits or ServeLimits()
    worker = Worker(pipe, limits.max_queue)
    info = {"model": describe_model(pipe, model_name), "limits": asdict(limits), "defaults": {}}
    info["defaults"] = {**sampler_defaults(pipe), "mode": "interleaved", "preview_every": preview_every}

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: a request never picks a path
            return _error(404, "not found")
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache"}
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers=headers)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **worker.status()})

    async def model(request: Request) -> Response:
        return JSONResponse(info)

    async def generate(request: Request) -> Response:
        try:
            job = await _make_job(request)
            worker.submit(job)
        except RequestError as e:
            headers = {"Retry-After": "5"} if e.status == 503 else None
            return _error(e.status, e.message, headers)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "X-Job-Id": job.id}
        return StreamingResponse(_stream(job), media_type="text/event-stream", headers=headers)

    async def _make_job(request: Request) -> Job:
        _check_origin(request)
        content_type = request.headers.get("content-type", "")
        body = await read_body(request, limits.max_body_bytes)
        # parsing and image decoding take CPU time: off the event loop, which keeps streaming
        prompt, options = await run_in_threadpool(parse_request, body, content_type, limits, preview_every)
        return Job(prompt, options, asyncio.get_running_loop())

    async def _stream(job: Job) -> AsyncIterator[str]:
        try:
            while True:
                try:
                    message = await asyncio.wait_for(job.messages.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if message is None:
                    return
                yield sse(*message)
        finally:
            worker.cancel(job.id)  # the client went away (or we are done: then a no-op)

    async def cancel(request: Request) -> Response:
        try:
            _check_origin(request)
        except RequestError as e:
            return _error(e.status, e.message)
        job_id = request.path_params["job_id"]
        if not worker.cancel(job_id):
            return _error(404, f"no queued or running request {job_id[:40]!r}")
        return JSONResponse({"id": job_id, "cancelled": True})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/api/model", model, methods=["GET"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.worker = worker
    if allowed_hosts is not None:
        app.add_middleware(_HostCheck, allowed=tuple(h.lower() for h in allowed_hosts))
    return app


class _HostCheck:
    """Refuse requests whose Host header names another machine (DNS rebinding on loopback)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not _host_allowed(host, self.allowed):
                response = _error(400, f"host {host[:60]!r} is not served here (use --allow-host)")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
