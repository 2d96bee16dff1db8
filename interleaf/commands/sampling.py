"""`interleaf generate`, `caption` and `draw`: stream a model's text and images to the terminal.

Text is printed as it is generated, a progress bar runs while an image is drawn, and the output
directory receives `document.md`, `document.html` and the PNGs (written only once generation has
finished, each file atomically: an interrupted run leaves no half-written file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "interleaf-out"


# The options a model directory may set in its sampling.yaml, as flag: (Request field, type, what
# it is, the sampler's default). In generate, caption and draw a flag left out takes the model's
# value, else the sampler's default (shown in the help); export writes the given ones to the file.
MODEL_OPTIONS = {
    "temperature": ("temperature", float, "text temperature, 0 = greedy", 0.7),
    "top_k": ("top_k", int, "text top-k, 0 = off", 0),
    "top_p": ("top_p", float, "text nucleus mass in (0, 1]", 0.9),
    "repetition_penalty": ("repetition_penalty", float, "text repetition penalty, 1 = off", 1),
    "image_temperature": ("image_temperature", float, "image-token temperature", 1.0),
    "image_top_k": ("image_top_k", int, "image-token top-k, 0 = off", 0),
    "image_top_p": ("image_top_p", float, "image-token nucleus mass, 1 = off", 1.0),
    "cfg": ("cfg_scale", float, "classifier-free guidance scale for images, 1 = off", 3.0),
    "image_cfg": ("image_cfg_scale", float, "guidance scale toward the prompt's images (two-scale guidance)", "--cfg"),
}


def _add_model_options(g, defaults: dict, help_tail) -> None:
    """One flag per MODEL_OPTIONS entry; `defaults` sets a command's own ones, `help_tail` ends each help."""
    for flag, (_, kind, what, sampler) in MODEL_OPTIONS.items():
        default = defaults.get(flag)
        tail = f"(default {default:g})" if default is not None else help_tail(sampler)
        g.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            default=default,
            metavar="N" if kind is int else "X",
            help=f"{what} {tail}",
        )


def add_model_default_args(p: argparse.ArgumentParser) -> None:
    """`export`: the MODEL_OPTIONS, to write into the model directory's sampling.yaml."""
    g = p.add_argument_group(
        "sampling defaults",
        "written to the model's sampling.yaml; an earlier export's "
        "values are kept for the options not given (a given --cfg without --image-cfg "
        "sets image guidance too, as for generate)",
    )
    _add_model_options(g, {}, lambda sampler: f"(the sampler's default: {sampler})")


def given_model_options(args: argparse.Namespace) -> dict:
    """The MODEL_OPTIONS given on the command line, by Request field."""
    return {
        field: getattr(args, flag) for flag, (field, *_) in MODEL_OPTIONS.items() if getattr(args, flag) is not None
    }


def add_sampling_args(p: argparse.ArgumentParser, temperature: float | None = None) -> None:
    """The options shared by generate, caption and draw (`temperature`: this command's own default)."""
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="generated tokens at most (default: one image in image mode, "
        "else 256 text tokens plus room for the images)",
    )
    _add_model_options(
        g, {"temperature": temperature}, lambda sampler: f"(default: the model's sampling.yaml, else {sampler})"
    )
    g.add_argument("--seed", type=int, default=0, help="random seed; sample i uses seed + i (default 0)")
    g.add_argument("--num", type=int, default=1, help="number of samples, decoded as one batch (default 1)")
    g.add_argument("--preview-every", type=int, default=0, metavar="N", help=argparse.SUPPRESS)
    d = p.add_argument_group("model")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    d.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text, an image, or an interleaved document from a prompt",
        description="Stream text and images from a model directory. Example: interleaf generate "
        "runs/shapes-tiny/export --prompt 'a red circle' --mode image --out out/",
    )
    p.add_argument("model_dir", help="model directory (from `interleaf export` or `convert`)")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="prompt image (repeatable); each <image> in --prompt takes the next one, else they come first",
    )
    p.add_argument(
        "--mode", choices=("text", "image", "interleaved"), default="text", help="what to generate (default text)"
    )
    p.add_argument("--max-images", type=int, default=1, help="images at most in interleaved mode (default 1)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    add_sampling_args(p)
    p.set_defaults(func=generate_command)

    p = subparsers.add_parser(
        "caption",
        help="describe an image",
        description="Caption an image. Example: interleaf caption MODEL_DIR photo.png",
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("image_path", metavar="IMAGE", help="image file")
    p.add_argument("--prompt", default="", help="text after the image (e.g. a question)")
    p.add_argument("--out", default=None, help="also write document.md/.html here")
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=caption_command, mode="text", max_images=0)

    p = subparsers.add_parser(
        "draw",
        help="draw an image from a description",
        description='Draw an image. Example: interleaf draw MODEL_DIR "a red circle"',
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("text", metavar="PROMPT", help="what to draw")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    add_sampling_args(p)
    p.set_defaults(func=draw_command, mode="image", max_images=1)


def generate_command(args: argparse.Namespace) -> int:
    from interleaf.tokenizer.multimodal import place_images

    return run(args, place_images(args.prompt or "", [Path(p) for p in args.image]))


def caption_command(args: argparse.Namespace) -> int:
    return run(args, [Path(args.image_path)] + ([args.prompt] if args.prompt else []))


def draw_command(args: argparse.Namespace) -> int:
    return run(args, [args.text])


def requests_from_args(args: argparse.Namespace, prompt: list):
    """Validated requests (one per sample) from the command line."""
    from interleaf.errors import InterleafError
    from interleaf.pipeline import read_sampling_defaults, with_sampling_defaults
    from interleaf.sampling.generate import build_requests

    if not any(isinstance(item, Path) or item.strip() for item in prompt):
        raise InterleafError("the prompt is empty: give --prompt TEXT and/or --image PATH")
    given = given_model_options(args)
    model = read_sampling_defaults(args.model_dir) if Path(args.model_dir).is_dir() else {}
    requests = build_requests(
        prompt,
        num=args.num,
        seed=args.seed,
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        max_images=args.max_images,
        preview_every=args.preview_every,
        **with_sampling_defaults(model, given),
    )
    for r in requests:
        r.validate()
    return requests


def check_inputs(args: argparse.Namespace, prompt: list) -> None:
    """Fail fast, before loading the model, on unreadable images and unusable paths."""
    from interleaf.errors import InterleafError
    from interleaf.tokenizer.image import open_image
    from interleaf.utils import check_writable

    if not Path(args.model_dir).is_dir():
        raise InterleafError(f"model directory not found: {args.model_dir}")
    for item in prompt:
        if isinstance(item, Path):
            open_image(item).close()
    if args.out is not None:
        check_writable(args.out, "--out")


def device_args(args: argparse.Namespace) -> dict:
    """--device / --dtype as keyword arguments of `interleaf.load` (unset ones left out)."""
    from interleaf.pipeline import check_device

    out = {"device": str(check_device(args.device, "--device"))}
    if args.dtype is not None:
        from interleaf.pipeline import parse_dtype

        out["dtype"] = parse_dtype(args.dtype)  # the names `convert --dtype` takes
    return out


def run(args: argparse.Namespace, prompt: list) -> int:
    """Load, stream to the terminal, write the documents, print where they are."""
    import interleaf
    from interleaf.sampling.generate import stream_requests
    from interleaf.sampling.render import write_documents

    requests = requests_from_args(args, prompt)
    check_inputs(args, prompt)
    pipe = interleaf.load(args.model_dir, **device_args(args))
    printer = TerminalPrinter(len(requests))
    try:
        for event in stream_requests(pipe, requests):
            printer(event)
    finally:
        printer.close()
    docs = [printer.done[i].document for i in sorted(printer.done)]
    if args.out is not None:
        out = write_documents(args.out, docs)
        for path in [out.markdown, out.html, *out.images]:
            print(path)
    n = sum(d.n_generated_tokens for d in printer.done.values())
    seconds = max(d.seconds for d in printer.done.values())
    print(f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


class TerminalPrinter:
    """Prints text as it streams (one sample) or per finished sample (several); image progress bars."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.bars: dict = {}
        self.done: dict = {}
        self.at_line_start = True

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from interleaf.sampling.events import Done, ImageDone, ImageProgress, ImageStart, TextDelta

        if isinstance(event, TextDelta) and self.n_rows == 1:
            self.write(event.text)
        elif isinstance(event, ImageStart):
            self.newline()
            desc = f"image {event.index + 1}" + (f" (sample {event.row + 1})" if self.n_rows > 1 else "")
            self.bars[event.row] = tqdm(
                total=event.tokens_total,
                desc=desc,
                unit="tok",
                leave=True,
                file=sys.stderr,
                position=event.row if self.n_rows > 1 else None,
            )
        elif isinstance(event, ImageProgress) and event.row in self.bars:
            bar = self.bars[event.row]
            bar.update(event.tokens_done - bar.n)
        elif isinstance(event, ImageDone) and event.row in self.bars:
            self.bars.pop(event.row).close()
            if self.n_rows == 1:
                self.write(f"[image {event.index + 1}]")
        elif isinstance(event, Done):
            self.done[event.row] = event
            if self.n_rows > 1 and event.document.text:
                self.newline()
                self.write(f"--- sample {event.row + 1} ---\n{event.document.text}\n")

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.at_line_start = text.endswith("\n")

    def newline(self) -> None:
        if not self.at_line_start:
            self.write("\n")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.newline()
