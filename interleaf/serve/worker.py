"""The worker that owns the model, the queue in front of it, and the sampler's events as SSE.

One worker thread runs requests one at a time, in order, through `stream_requests`; a cancel
flag is checked between events and closing the sampler's generator stops the decode at once.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import io
import json
import secrets
import threading
import time

from PIL import Image

from interleaf.errors import InterleafError
from interleaf.sampling import generate as G
from interleaf.sampling.events import Done, ImageDone, ImageProgress, ImageStart, TextDelta
from interleaf.sampling.params import SamplingParams
from interleaf.serve.forms import RequestError
from interleaf.utils import get_logger

log = get_logger(__name__)


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

    def __init__(self, prompt: list, params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.id = secrets.token_hex(8)
        self.prompt = prompt
        self.params = params
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
        job.emit("start", {"seed": job.params.seed, "queue_seconds": round(waited, 4)})
        events = None
        try:
            # the prompt as built: a text item is the user's text, never looked up as a file here
            events = G.stream_requests(self.pipe, [G.Request(job.prompt, job.params)])
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
            if events is not None:
                events.close()  # GeneratorExit inside the sampler: the decode stops here
