"""`interleaf generate`, `caption` and `draw`: stream a model's text and images to the terminal.

Text is printed as it is generated, a progress bar runs while an image is drawn, and the output
directory receives `document.md`, `document.html` and the PNGs (written only once generation has
finished, each file atomically: an interrupted run leaves no half-written file).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

# Only the option declarations (no torch) at import: building the parser stays quick. Like every
# command module, this one imports the library inside the commands, for the CLI's start-up time.
from interleaf.sampling.params import DEFAULTS, KINDS, OPTIONS, PER_MODEL, requirement

DEFAULT_OUT = "interleaf-out"
END_OF_TURN_HELP = "<eot> in it is the end of a turn (the model's end-of-turn token)"


def flag_of(name: str) -> str:
    """The command-line flag of a sampling option (`--cfg` for cfg_scale, else --name-with-dashes)."""
    return OPTIONS[name].flag or "--" + name.replace("_", "-")


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_option_flags(g, names, help_tail) -> None:
    """One flag per sampling option in `names`, default None (= not given); `help_tail(name)` ends each help."""
    for name in names:
        kind, _, choices = KINDS[name]
        g.add_argument(
            flag_of(name),
            dest=name,
            type=kind,
            choices=choices or None,
            default=None,
            metavar=None if choices else "N" if kind is int else "X",
            help=f"{OPTIONS[name].help}; {requirement(name)} {help_tail(name)}",
        )


def add_model_default_args(p: argparse.ArgumentParser) -> None:
    """`export`: the per-model sampling options, to write into the model directory's sampling.yaml."""
    g = p.add_argument_group(
        "sampling defaults",
        "written to the model's sampling.yaml; an earlier export's "
        "values are kept for the options not given (a given --cfg without --image-cfg "
        "sets image guidance too, as for generate)",
    )
    add_option_flags(g, PER_MODEL, lambda name: "" if DEFAULTS[name] is None else f"(sampler: {_show(DEFAULTS[name])})")


def given_options(args: argparse.Namespace) -> dict:
    """The sampling options on the command line (a command's own defaults count as given), by field."""
    return {k: v for k, v in vars(args).items() if k in OPTIONS and v is not None}


def add_sampling_args(p: argparse.ArgumentParser, fixed: dict | None = None, own: dict | None = None) -> None:
    """The sampling options of generate, caption and draw: a flag for each but those the command
    `fixed` (caption's mode), with the command's `own` defaults (caption's greedy temperature),
    which count as given: they win over a model's sampling.yaml."""
    fixed, own = fixed or {}, own or {}

    def tail(name: str) -> str:
        if name in own:
            return f"(default {_show(own[name])})"
        if DEFAULTS[name] is None:
            return ""
        if name in PER_MODEL:
            return f"(default: the model's sampling.yaml, else {_show(DEFAULTS[name])})"
        return f"(default {_show(DEFAULTS[name])})"

    g = p.add_argument_group("sampling")
    add_option_flags(g, [name for name in OPTIONS if name not in fixed], tail)
    p.set_defaults(**fixed, **own)  # after the flags: a flag's own default (None) would hide these
    g.add_argument("--num", type=int, default=1, help="number of samples, decoded as one batch (default 1)")
    add_model_args(p)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """How the model runs (generate, caption, draw and serve): the keyword arguments of `interleaf.load`."""
    d = p.add_argument_group("model")
    d.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    d.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the model's)")
    d.add_argument(
        "--compile",
        action="store_true",
        help="decode with a compiled one-token step (static shapes, CUDA graphs): for GPUs; each new "
        "batch size and cache bucket waits for its compilation first",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text, an image, or an interleaved document from a prompt",
        description="Stream text and images from a model directory. Example: interleaf generate "
        "runs/shapes-tiny/export --prompt 'a red circle' --mode image --out out/",
    )
    p.add_argument("model_dir", help="model directory (from `interleaf export` or `convert`)")
    p.add_argument("--prompt", default="", help=f"prompt text; {END_OF_TURN_HELP}")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="prompt image (repeatable); each <image> in --prompt takes the next one, else they come first",
    )
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
    p.add_argument("--prompt", default="", help=f"text after the image (e.g. a question); {END_OF_TURN_HELP}")
    p.add_argument("--out", default=None, help="also write document.md/.html here")
    add_sampling_args(p, fixed={"mode": "text", "max_images": 0}, own={"temperature": 0.0})
    p.set_defaults(func=caption_command)

    p = subparsers.add_parser(
        "draw",
        help="draw an image from a description",
        description='Draw an image. Example: interleaf draw MODEL_DIR "a red circle"',
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("text", metavar="PROMPT", help=f"what to draw; {END_OF_TURN_HELP}")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    add_sampling_args(p, fixed={"mode": "image", "max_images": 1})
    p.set_defaults(func=draw_command)


def generate_command(args: argparse.Namespace) -> int:
    from interleaf.sampling.prompt import Image
    from interleaf.tokenizer.multimodal import parse_prompt_text

    return run(args, parse_prompt_text(args.prompt or "", [Image(p) for p in args.image]))


def caption_command(args: argparse.Namespace) -> int:
    from interleaf.sampling.prompt import Image
    from interleaf.tokenizer.multimodal import parse_prompt_text

    return run(args, parse_prompt_text(args.prompt, [Image(args.image_path)]))


def draw_command(args: argparse.Namespace) -> int:
    from interleaf.tokenizer.multimodal import parse_prompt_text

    return run(args, parse_prompt_text(args.text, []))


@contextlib.contextmanager
def named_as_flags():
    """A refused sampling value names the flag that gave it (`--cfg`, not cfg_scale)."""
    from interleaf.errors import InterleafError
    from interleaf.sampling.params import OptionError

    try:
        yield
    except OptionError as e:
        raise InterleafError(e.message(flag_of(e.name))) from None


def requests_from_args(args: argparse.Namespace, prompt: list):
    """Checked requests (one per sample) from the command line: flags over the model's sampling.yaml."""
    from interleaf.errors import InterleafError
    from interleaf.pipeline import read_sampling_defaults
    from interleaf.sampling.generate import build_requests
    from interleaf.sampling.params import SamplingParams, merge_options

    if not any(not isinstance(item, str) or item.strip() for item in prompt):
        raise InterleafError("the prompt is empty: give --prompt TEXT and/or --image PATH")
    model = read_sampling_defaults(args.model_dir) if Path(args.model_dir).is_dir() else {}
    with named_as_flags():  # also for the seeds of a batch: seed + i is checked as a seed
        return build_requests(prompt, SamplingParams(**merge_options(model, given_options(args))), args.num)


def check_inputs(args: argparse.Namespace, prompt: list) -> None:
    """Fail fast, before loading the model, on unreadable images and unusable paths."""
    from interleaf.errors import InterleafError
    from interleaf.sampling.prompt import Image
    from interleaf.tokenizer.image import open_image
    from interleaf.utils import check_writable

    if not Path(args.model_dir).is_dir():
        raise InterleafError(f"model directory not found: {args.model_dir}")
    for item in prompt:
        if isinstance(item, Image):
            open_image(item.source).close()
    if args.out is not None:
        check_writable(args.out, "--out")


def load_args(args: argparse.Namespace) -> dict:
    """--device / --dtype / --compile as keyword arguments of `interleaf.load` (--dtype left out when unset)."""
    from interleaf.pipeline import check_device

    out = {"device": str(check_device(args.device, "--device")), "compile": args.compile}
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
    pipe = interleaf.load(args.model_dir, **load_args(args))
    with named_as_flags():  # values the model cannot serve are refused before the first token
        events = stream_requests(pipe, requests)
    printer = TerminalPrinter(len(requests))
    try:
        for event in events:
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
