"""The viewer's server, for real: uvicorn on a loopback port, a tiny random model, HTTP clients.

What a request streams must equal what the library generates for the same prompt, options and
seed; a cancelled request must stop the decode and let the next queued one run; bad requests get
a 4xx with a clear message and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.sampling import generate as G
from interleaf.sampling.events import ImageProgress
from interleaf.sampling.params import DEFAULTS, KINDS, OPTIONS
from interleaf.serve import ServeLimits, create_app

PREVIEW_EVERY = 16
LIMITS = ServeLimits(
    max_prompt_chars=200, max_uploads=2, max_upload_bytes=64 << 10, max_image_side=256,
    max_queue=3, max_new_tokens=400, max_images=2,
)  # fmt: skip


# ---- a tiny model directory (also used by test_serve_browser.py) ---------------------------------
def tiny_model_dir(path: Path, interleave: bool = False) -> Path:
    """A random tiny model: BPE on shapes texts, 32 px VQ-GAN (8x8 codes), 2-layer transformer.

    `interleave=True` biases it so that interleaved generation writes a few words, draws an
    image, then writes on (a random model would rarely draw, and write mostly stray bytes).
    """
    from interleaf.data.shapes import ShapesWorld
    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.text import train_bpe
    from interleaf.tokenizer.vocab import Vocabulary
    from interleaf.tokenizer.vqgan import VQConfig, VQModel

    torch.manual_seed(0)
    world = ShapesWorld(resolution=32, seed=0)
    text = train_bpe((t for i in range(60) for t in world.texts(i)), vocab_size=400)
    vq_config = VQConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16,
                         norm_groups=8, n_embed=64, embed_dim=8)  # fmt: skip
    vqgan = VQModel(vq_config).eval()
    vocab = Vocabulary.build(text.vocab_size, vq_config.n_embed, vq_config.grid)
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=vocab.size, multiple_of=16, max_seq_len=512)
    model = Transformer(args).eval()
    if interleave:
        _bias_output(model, vocab, text, boi=3.5, words=3.0)
    save_model_dir(path, model, vocab, text, vqgan)
    return path


@torch.no_grad()
def _bias_output(model, vocab, text, boi: float, words: float) -> None:
    """Give every embedding one shared direction u, so the final hidden state is ~u whatever
    the context; then the output rows set fixed logits along u: `<boi>` +boi, `<eos>` -3 boi,
    and +words for text tokens that are whole words (about 5% <boi>, 85% words per step)."""
    dim = model.args.dim
    u = torch.randn(dim)
    u /= u.norm()
    model.tok_embeddings.weight += u * dim**0.5
    out = model.output.weight  # (V, dim); logit = out[v] . (u sqrt(dim)) after the final norm
    for i in range(16, vocab.n_text):
        piece = text.decode([i])  # " square", " red", ...: a space, then 3+ letters
        if piece.startswith(" ") and len(piece) >= 4 and piece[1:].isascii() and piece[1:].isalpha():
            out[i] += u * words / dim**0.5
    out[vocab.boi_id] = u * boi / dim**0.5
    out[vocab.eos_id] = -3 * u * boi / dim**0.5


# ---- a live server -------------------------------------------------------------------------------
class Gate:
    """Wraps the sampler's `stream_requests` (the worker's only way to the model) so that a test can
    hold a stream before a given image token, and count streams closed before they ended."""

    def __init__(self, real):
        self.real = real
        self.hold_before: int | None = None  # hold before ImageProgress(tokens_done=this)
        self.gate = threading.Event()
        self.closed_early = 0  # streams closed (GeneratorExit) before they ended

    def __call__(self, pipe, requests):
        self.requests = list(requests)  # the last requests the worker ran
        events = self.real(pipe, requests)  # raises here on bad requests, like the real one
        return self._gated(events)

    def _gated(self, events):
        finished = False
        try:
            for event in events:
                if isinstance(event, ImageProgress) and event.tokens_done == self.hold_before:
                    assert self.gate.wait(20), "test gate never opened"
                yield event
            finished = True
        finally:
            if not finished:
                self.closed_early += 1
            events.close()


class LiveServer:
    """uvicorn serving an app on a loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        from interleaf.commands.serve import bind

        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def pipe(model_dir):
    from interleaf.pipeline import load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core box: threads only wait on each other
    yield load(model_dir, device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gated():
    with pytest.MonkeyPatch.context() as mp:
        gate = Gate(G.stream_requests)
        mp.setattr(G, "stream_requests", gate)
        yield gate


@pytest.fixture(scope="module")
def server(pipe, gated):
    app = create_app(pipe, LIMITS, model_name="tiny", preview_every=PREVIEW_EVERY)
    with LiveServer(app) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def sse_events(response: httpx.Response):
    """(event name, data) pairs of a server-sent event stream."""
    name, data = None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and name:
            yield name, json.loads("\n".join(data))
            name, data = None, []


def run_request(client, **kwargs) -> list[tuple[str, dict]]:
    """POST /api/generate and read its whole stream."""
    with client.stream("POST", "/api/generate", **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


# ---- tests -----------------------------------------------------------------------------------------
def test_page_defaults_are_the_models_sampling_yaml_over_the_samplers(model_dir, tmp_path):
    import shutil

    from interleaf.pipeline import load, write_sampling_defaults

    def info(directory):
        app = create_app(load(directory), LIMITS, preview_every=PREVIEW_EVERY)
        with LiveServer(app) as live:
            return httpx.get(live.url + "/api/model").json()

    own = info(model_dir)
    assert own["defaults"] == {**DEFAULTS, "mode": "interleaved", "preview_every": PREVIEW_EVERY, "seed": None}
    with_file = tmp_path / "with-file"
    shutil.copytree(model_dir, with_file)
    write_sampling_defaults(with_file, cfg_scale=60.0, image_temperature=0.3, top_k=7)
    assert info(with_file)["defaults"] == {**own["defaults"], "cfg_scale": 60.0, "image_temperature": 0.3, "top_k": 7}


def test_health_and_model_description(client, pipe):
    assert client.get("/health").json() == {"status": "ok", "queued": 0, "running": False}
    info = client.get("/api/model").json()
    m = info["model"]
    assert m["name"] == "tiny"
    assert m["parameters"] == sum(p.numel() for p in pipe.model.parameters())
    assert m["vocab_size"] == pipe.vocab.size and m["n_image_codes"] == 64
    assert m["tokens_per_image"] == 64 and m["image_grid"] == [8, 8] and m["image_resolution"] == 32
    assert m["can_draw"] is True
    assert info["limits"]["max_upload_bytes"] == LIMITS.max_upload_bytes
    assert info["defaults"]["preview_every"] == PREVIEW_EVERY
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for name in ("/", "/static/app.js", "/static/style.css"):  # everything ships with the package
        assert "http://" not in client.get(name).text and "https://" not in client.get(name).text
    assert client.get("/static/..%2Fapp.py").status_code == 404


def test_text_request_streams_what_the_library_generates(client, pipe):
    options = dict(mode="text", max_new_tokens=24, temperature=1.0, top_p=0.95, seed=5)
    events = run_request(client, json={"prompt": "a red circle", **options})
    names = [n for n, _ in events]
    assert names[:2] == ["queued", "start"] and names[-1] == "done"
    assert set(names[2:-1]) <= {"text"}
    assert events[0][1]["position"] == 1 and events[1][1]["seed"] == 5
    ref = pipe.generate("a red circle", **options)
    assert "".join(d["text"] for n, d in events if n == "text") == ref.text
    done = events[-1][1]
    assert done["n_generated_tokens"] == len(ref.token_ids) and done["n_prompt_tokens"] > 1
    assert done["seconds"] > 0 and done["tokens_per_s"] > 0


def test_min_p_over_http_is_what_the_library_draws(client, pipe):
    options = dict(mode="text", max_new_tokens=16, temperature=1.0, min_p=0.9, seed=3)
    events = run_request(client, data={"prompt": "a red circle", **{k: str(v) for k, v in options.items()}})
    ref = pipe.generate("a red circle", **options)
    assert "".join(d["text"] for n, d in events if n == "text") == ref.text
    assert ref.token_ids != pipe.generate("a red circle", **{**options, "min_p": 0.0}).token_ids  # it did cut
    r = client.post("/api/generate", json={"prompt": "x", "min_p": 1.5})
    assert r.status_code == 400 and r.json()["error"] == "min_p must be a number in [0, 1], got 1.5"


def test_image_request_with_upload_streams_previews_and_the_image(client, pipe):
    from interleaf.data.shapes import ShapesWorld

    picture, caption, _ = ShapesWorld(resolution=48, seed=3).pair(0)
    prompt = f"<image> {caption}. Now the same scene:"
    form = {"prompt": prompt, "mode": "image", "seed": "7", "cfg_scale": "2.5"}
    events = run_request(client, data=form, files={"image": ("scene.png", png_bytes(picture), "image/png")})
    names = [n for n, _ in events]
    assert names[:3] == ["queued", "start", "image_start"] and names[-2:] == ["image_done", "done"]
    progress = [d for n, d in events if n == "image_progress"]
    assert [p["tokens_done"] for p in progress] == list(range(1, 65))
    assert [p["tokens_done"] for p in progress if p["preview"]] == [16, 32, 48]
    done = dict(events)["image_done"]
    assert (done["width"], done["height"]) == (32, 32)

    ref = pipe.generate([picture, f" {caption}. Now the same scene:"], mode="image", seed=7, cfg_scale=2.5)
    assert np.array_equal(from_data_url(done["image"]), np.asarray(ref.images[0]))
    previews = [from_data_url(p["preview"]) for p in progress if p["preview"]]
    assert all(p.shape == (32, 32, 3) for p in previews)
    assert not np.array_equal(previews[0], previews[1]) and not np.array_equal(previews[1], previews[2])


def _read_until(stream_iter, predicate) -> list[tuple[str, dict]]:
    seen = []
    for name, data in stream_iter:
        seen.append((name, data))
        if predicate(name, data):
            return seen
    raise AssertionError(f"stream ended before the expected event: {seen[-3:]}")


def test_cancel_mid_image_frees_the_slot_for_the_next_request(server, gated, client):
    """A holds at image token 20; B and C queue behind it; the queue is then full (503).
    C is cancelled while queued, A while drawing: A's decode stops, B runs to the end."""
    gated.hold_before, closed_before = 20, gated.closed_early
    gated.gate.clear()
    image_req = {"json": {"prompt": "a green square", "mode": "image", "seed": 1}}
    text_req = {"json": {"prompt": "a blue triangle", "mode": "text", "max_new_tokens": 12, "seed": 2}}
    with httpx.Client(base_url=server.url, timeout=30) as ca, httpx.Client(base_url=server.url, timeout=30) as cb, \
            httpx.Client(base_url=server.url, timeout=30) as cc:  # fmt: skip
        with ca.stream("POST", "/api/generate", **image_req) as ra:
            a = sse_events(ra)
            a_seen = _read_until(a, lambda n, d: n == "image_progress" and d["tokens_done"] == 19)
            a_id = a_seen[0][1]["id"]
            with cb.stream("POST", "/api/generate", **text_req) as rb, \
                    cc.stream("POST", "/api/generate", **text_req) as rc:  # fmt: skip
                b, c = sse_events(rb), sse_events(rc)
                b_first, c_first = next(b), next(c)
                assert b_first[0] == c_first[0] == "queued"
                assert {b_first[1]["position"], c_first[1]["position"]} == {1, 2}
                if b_first[1]["position"] == 2:  # the two raced: keep b as the first in line
                    b, c, b_first, c_first = c, b, c_first, b_first
                assert b_first[1]["ahead"] == 1 and c_first[1]["ahead"] == 2
                assert client.get("/health").json() == {"status": "ok", "queued": 2, "running": True}
                full = client.post("/api/generate", json={"prompt": "one more"})
                assert full.status_code == 503 and "queue is full" in full.json()["error"]

                r = client.post(f"/api/jobs/{c_first[1]['id']}/cancel")
                assert r.status_code == 200 and r.json()["cancelled"] is True
                assert list(c) == [("cancelled", {"id": c_first[1]["id"], "while": "queued"})]
                assert client.post(f"/api/jobs/{a_id}/cancel").status_code == 200
                gated.gate.set()
                a_rest = list(a)
                b_rest = list(b)
    assert [n for n, _ in a_rest] == ["cancelled"] and a_rest[0][1]["while"] == "running"
    assert not any(n == "image_done" for n, _ in a_seen + a_rest)
    assert gated.closed_early == closed_before + 1  # the sampler's generator was closed mid-image
    b_names = [n for n, _ in b_rest]
    assert b_names[0] == "start" and b_names[-1] == "done" and "cancelled" not in b_names
    assert client.post(f"/api/jobs/{a_id}/cancel").status_code == 404  # finished: nothing to cancel
    gated.hold_before = None
    _wait_idle(client)


def test_a_client_that_goes_away_frees_its_slot(server, gated, client):
    gated.hold_before = 5
    gated.gate.clear()
    with httpx.Client(base_url=server.url, timeout=30) as ca:
        with ca.stream("POST", "/api/generate", json={"prompt": "x", "mode": "image", "seed": 3}) as ra:
            _read_until(sse_events(ra), lambda n, d: n == "image_progress" and d["tokens_done"] == 4)
            closed_before = gated.closed_early
        # the response is closed here: the server notices and cancels the request
    gated.gate.set()
    _wait_idle(client)
    assert gated.closed_early == closed_before + 1
    gated.hold_before = None


def _wait_idle(client, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while client.get("/health").json() != {"status": "ok", "queued": 0, "running": False}:
        assert time.time() < deadline, "server did not become idle"
        time.sleep(0.05)


def _png(w: int, h: int) -> bytes:
    return png_bytes(Image.new("RGB", (w, h), (200, 30, 30)))


BAD_REQUESTS = {
    "oversized upload": (dict(files={"image": ("big.png", b"\x89PNG" + bytes(70_000))}), 413,
                         "upload 'big.png' is 68 KB; the limit is 64 KB"),
    "oversized dimensions": (dict(files={"image": ("wide.png", _png(300, 8))}), 413, "300x8 pixels"),
    "not an image": (dict(files={"image": ("notes.txt", b"just some text\n")}), 415, "'notes.txt' is not an image"),
    "damaged image": (dict(files={"image": ("cut.png", _png(64, 64)[:80])}), 400, "'cut.png' is a damaged PNG"),
    "path in a file name": (dict(files={"image": ("../../etc/passwd", b"root:x:0:0")}), 415,
                            "'passwd' is not an image"),
    "too many uploads": (dict(files=[("image", ("a.png", _png(8, 8)))] * 3), 400,
                         "form refused: Too many files. Maximum number of files is 2."),
    "too many fields": (dict(content=b"&".join([b"seed=1"] * 40),
                             headers={"content-type": "application/x-www-form-urlencoded"}), 400, "Too many fields"),
    "long field": (dict(content=b"prompt=" + b"x" * 2000,
                        headers={"content-type": "application/x-www-form-urlencoded"}),
                   400, "form refused: Field exceeded maximum size"),
    "text as image": (dict(data={"prompt": "x", "image": "not a file"}), 400, "form field 'image' must be a file"),
    "file as text": (dict(data={"mode": "text"}, files={"prompt": ("a.txt", b"x")}), 400,
                     "form field 'prompt' must be text"),
    "long prompt": (dict(data={"prompt": "x" * 201}), 413, "201 characters; the limit is 200"),
    "bad mode": (dict(json={"prompt": "x", "mode": "video"}), 400, "mode must be one of"),
    "bad number": (dict(json={"prompt": "x", "temperature": "warm"}), 400, "temperature must be a number"),
    "not finite": (dict(json={"prompt": "x", "cfg_scale": "nan"}), 400, "cfg_scale must be a number in [0, 1000]"),
    "form text out of range": (dict(data={"prompt": "x", "image_top_p": "1.5"}), 400, "image_top_p must be a number"),
    "fractional int": (dict(json={"prompt": "x", "seed": 1.5}), 400, "seed must be an integer"),
    "top_p zero": (dict(json={"prompt": "x", "top_p": 0}), 400, "top_p must be a number in (0, 1], got 0"),
    "too many tokens": (dict(json={"prompt": "x", "max_new_tokens": 401}), 400,
                        "max_new_tokens must be at most 400 on this server, got 401"),
    "too many images": (dict(json={"prompt": "x", "max_images": 3}), 400, "max_images must be at most 2"),
    "unknown field": (dict(json={"prompt": "x", "temprature": 1}), 400, "unknown field 'temprature'"),
    "json image": (dict(json={"prompt": "x", "image": "abc"}), 400, "send images as multipart"),
    "marker mismatch": (dict(data={"prompt": "<image> and <image>"}, files={"image": ("a.png", _png(8, 8))}), 400,
                        "2 <image> markers but 1 images were uploaded"),
    "empty prompt": (dict(json={"prompt": ""}), 400, "the prompt is empty"),
    "malformed json": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "malformed JSON"),
    "deep json": (dict(content=b"[" * 50_000 + b"]" * 50_000, headers={"content-type": "application/json"}), 400,
                  "JSON body not accepted"),
    "huge integer": (dict(content=b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
                          headers={"content-type": "application/json"}), 400, "JSON body not accepted"),
    "malformed multipart": (dict(content=b"--xyz\r\nrubbish",
                                 headers={"content-type": "multipart/form-data; boundary=xyz"}),
                            400, "malformed multipart body: it stops before its closing boundary"),
    "no boundary": (dict(content=b"x", headers={"content-type": "multipart/form-data"}), 400,
                    "form refused: Missing boundary"),
    "no content type": (dict(content=b"prompt"), 415, "multipart/form-data"),
    "body too large": (dict(content=b"x" * (LIMITS.max_body_bytes + 1), headers={"content-type": "application/json"}),
                       413, "request body"),
    "foreign host": (dict(json={"prompt": "x"}, headers={"host": "evil.example:80"}), 400, "is not served here"),
    "cross origin": (dict(json={"prompt": "x"}, headers={"origin": "http://evil.example"}), 403, "cross-origin"),
    "sampler refuses": (dict(json={"prompt": "x", "max_new_tokens": 1, "mode": "image"}), 200,
                        "max_new_tokens must be at least 66 in image mode"),
}  # fmt: skip


def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, pipe):
    for case, (kwargs, status, message) in BAD_REQUESTS.items():
        kwargs = {**kwargs}
        if "files" in kwargs and "data" not in kwargs:
            kwargs["data"] = {"prompt": "describe"}
        r = client.post("/api/generate", **kwargs)
        assert r.status_code == status, (case, r.status_code, r.text[:200])
        if status == 200:  # accepted, then refused by the sampler: an error event, not a crash
            events = list(sse_events(r))
            assert [n for n, _ in events] == ["queued", "start", "error"], case
            assert message in events[-1][1]["message"], (case, events[-1])
            continue
        assert r.headers["content-type"] == "application/json", case
        assert message in r.json()["error"], (case, r.json())
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/generate").status_code == 405
    assert client.get("/health").json()["status"] == "ok"
    events = run_request(client, json={"prompt": "still here", "mode": "text", "max_new_tokens": 4, "seed": 0})
    assert events[-1][0] == "done"


def option_values(name: str) -> tuple:
    """(an allowed value other than the server's default, a refused value) of a sampling option."""
    kind, _, choices = KINDS[name]
    if choices:
        return "interleaved", "nonsense"  # the requests below otherwise ask for text
    o = OPTIONS[name]
    if kind is int:
        good = next(v for v in (o.low + 1, o.low + 2) if v != DEFAULTS[name])
    else:
        good = o.low + (o.high - o.low) / 4
    return good, (o.high * 2 + 1 if o.high is not None else o.low - 1)


def test_every_option_is_a_field_checked_by_its_range_and_reaches_the_sampler(client, gated):
    """Derived, not listed: each SamplingParams field is a form field and a JSON field, refused out
    of its range (naming it), and when allowed arrives in the sampler's Request as sent."""
    info = client.get("/api/model").json()
    assert [o["name"] for o in info["options"]] == list(OPTIONS) and set(info["defaults"]) == set(OPTIONS)
    base = {"prompt": "x", "mode": "text", "max_new_tokens": "2"}
    for name in OPTIONS:
        good, bad = option_values(name)
        events = run_request(client, data={**base, name: str(good)})
        assert events[-1][0] == "done", (name, events[-1])
        assert getattr(gated.requests[0].params, name) == good, name
        r = client.post("/api/generate", json={**base, name: bad})
        assert r.status_code == 400 and r.json()["error"].startswith(f"{name} must be "), (name, r.text)


def test_cli_refuses_a_busy_port_and_bad_limits_before_loading(model_dir, capsys):
    from interleaf.cli import main
    from interleaf.commands.serve import bind, is_loopback

    busy = bind("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port)]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        busy.close()
    assert main(["serve", str(model_dir), "--max-queue", "0"]) == 2
    assert "--max-queue must be at least 1" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_host_header_check_knows_loopback_names_and_ports():
    from interleaf.serve.app import LOOPBACK_HOSTS, _host_allowed

    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "[::1]"):
        assert _host_allowed(host, LOOPBACK_HOSTS), host
    for host in ("evil.example:8000", "127.0.0.1.evil.example", "[::2]:80", "", "[::1"):
        assert not _host_allowed(host, LOOPBACK_HOSTS), host
