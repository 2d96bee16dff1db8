"""The web viewer's server: one page, and an API that streams the sampler's events.

    GET  /                       the page (static/index.html; app.js and style.css beside it)
    GET  /health                 {"status": "ok", "queued": n, "running": bool}
    GET  /api/model              the model's description, the request limits, every sampling
                                 option (group, range, help) and its default
    POST /api/generate           multipart form (or urlencoded, or JSON): prompt, options, `image`
                                 uploads; answers text/event-stream: queued, start, text,
                                 image_start, image_progress, image_done, done | cancelled | error
    POST /api/jobs/{id}/cancel   stop a queued or running request; its slot is freed at once

Requests are read and bounded in forms.py and run by the one worker thread in worker.py; a
request whose client goes away is cancelled the same way as one cancelled by the page.

Safety: the command binds to loopback unless told otherwise, and then only answers Host names
of this machine (no DNS rebinding); prompts, uploads, image sizes and the queue are bounded;
uploads are decoded as images or refused; nothing from a request names a file.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from interleaf.sampling.params import describe_options
from interleaf.serve.forms import SERVER_OPTIONS, RequestError, ServeLimits, prompt_and_options, read_fields
from interleaf.serve.worker import Job, Worker, sse

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
KEEPALIVE_S = 10.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


# ---- the model's description -----------------------------------------------------------------


def describe_model(pipe, name: str) -> dict:
    """What the page shows about the model: size, vocabulary, images."""
    model, vocab, vqgan, args = pipe.model, pipe.vocab, pipe.vqgan, pipe.model.args
    n_params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters())
    return {
        "name": name,
        "parameters": n_params,
        "parameters_human": _human(n_params),
        "vocab_size": vocab.size,
        "n_text_tokens": vocab.n_text,
        "n_image_codes": vocab.n_codes,
        "tokens_per_image": vocab.tokens_per_image,
        "image_grid": list(vocab.image_grid),
        "device": str(first.device),
        "dtype": str(first.dtype).replace("torch.", ""),
        "can_draw": vqgan is not None and vqgan.config.has_decoder,
        "image_resolution": vqgan.config.resolution if vqgan is not None else None,
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "max_seq_len": args.max_seq_len,
    }


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
    # the form's inputs and their values: the model's sampling.yaml over the sampler's defaults,
    # the server's over both; the seed is blank (each request without one gets a random seed)
    defaults = pipe.sampling_params(**SERVER_OPTIONS, preview_every=preview_every).to_dict()
    info = {
        "model": describe_model(pipe, model_name),
        "limits": asdict(limits),
        "options": describe_options(),
        "defaults": {**defaults, "seed": None},
    }

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
        fields, uploads = await read_fields(request, limits)
        # image decoding takes CPU time: off the event loop, which keeps streaming
        prompt, params = await run_in_threadpool(prompt_and_options, fields, uploads, pipe, limits, preview_every)
        return Job(prompt, params, asyncio.get_running_loop())

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
