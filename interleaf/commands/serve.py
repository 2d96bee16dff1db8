"""`interleaf serve`: the web viewer (a page and a streaming API) for one model directory.

The library (torch, the model, Starlette, uvicorn) is imported inside the command, not here:
building the `interleaf` parser imports every command module, and should not wait for them.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

from interleaf.commands.sampling import add_model_args, load_args

LOOPBACK_NAMES = ("localhost",)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the web viewer for a model directory",
        description=(
            "Keep a model loaded and serve a page that streams what it writes and draws, with an "
            "API (POST /api/generate, server-sent events). Binds to loopback unless --host says "
            "otherwise. Example: interleaf serve runs/shapes-tiny/export --port 8000"
        ),
    )
    p.add_argument("model_dir", help="model directory (from `interleaf export` or `convert`)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; 0.0.0.0 opens the viewer to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--preview-every",
        type=int,
        default=None,
        metavar="N",
        help="tokens between partial previews of an image (default: 1/8 of an image; 0: none)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name to answer to, e.g. behind a proxy (repeatable)",
    )
    p.add_argument("--max-queue", type=int, default=8, metavar="N", help="requests running or waiting (default 8)")
    p.add_argument("--max-prompt-chars", type=int, default=4000, metavar="N", help="prompt length (default 4000)")
    p.add_argument("--max-uploads", type=int, default=4, metavar="N", help="images per request (default 4)")
    p.add_argument(
        "--max-upload-mb", type=float, default=8.0, metavar="MB", help="size of one uploaded image (default 8)"
    )
    p.add_argument(
        "--max-image-side",
        type=int,
        default=4096,
        metavar="PX",
        help="pixels on either side of an uploaded image (default 4096)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=4096, metavar="N", help="tokens one request may ask for (default 4096)"
    )
    add_model_args(p)
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from interleaf.errors import InterleafError
    from interleaf.pipeline import load
    from interleaf.serve import ServeLimits
    from interleaf.serve.app import LOOPBACK_HOSTS

    if not 0 < args.max_upload_mb < 1 << 20:  # also nan and inf
        raise InterleafError(f"--max-upload-mb must be a number of megabytes above 0, got {args.max_upload_mb}")
    limits = ServeLimits(
        max_prompt_chars=args.max_prompt_chars,
        max_uploads=args.max_uploads,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_image_side=args.max_image_side,
        max_queue=args.max_queue,
        max_new_tokens=args.max_new_tokens,
    )
    for name, value in vars(limits).items():
        if value < 1:
            raise InterleafError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.preview_every is not None and args.preview_every < 0:
        raise InterleafError(f"--preview-every must be >= 0, got {args.preview_every}")
    loopback = is_loopback(args.host)
    allowed = (*LOOPBACK_HOSTS, *args.allow_host) if loopback or args.allow_host else None
    sock = bind(args.host, args.port)  # before the slow model load: a busy port fails at once
    try:
        pipe = load(args.model_dir, **load_args(args))
        serve(pipe, sock, limits, Path(args.model_dir).resolve().name, args.preview_every, allowed, loopback)
    finally:
        sock.close()
    return 0


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error."""
    from interleaf.errors import InterleafError

    if not 0 <= port <= 65535:
        raise InterleafError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise InterleafError(f"cannot resolve --host {host!r}: {e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InterleafError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(pipe, sock: socket.socket, limits, name: str, preview_every, allowed, loopback: bool) -> None:
    """Run the viewer on an already-bound socket until interrupted."""
    import uvicorn

    from interleaf.serve.app import create_app
    from interleaf.utils import get_logger

    log = get_logger("interleaf.serve")
    if preview_every is None:
        preview_every = max(1, pipe.vocab.tokens_per_image // 8)
    app = create_app(pipe, limits, model_name=name, preview_every=preview_every, allowed_hosts=allowed)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not loopback:
        log.warning("listening on %s: anyone who can reach this machine can use the model", host)
    print(f"interleaf viewer for {name} at http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
