"""`interleaf <command>`: parse arguments, call one function, report. No logic lives here.

Each area of the package declares its commands in `interleaf/commands/<area>.py` with a
`register(subparsers)` function; the parsers call into the library with `set_defaults(func=...)`.
User mistakes raise `InterleafError` and end as one line on stderr with exit status 2; an
unforeseen OSError (a full disk, a file that vanished) is one line too, with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from interleaf.errors import InterleafError
from interleaf.utils import setup_logging

COMMAND_MODULES = (
    "interleaf.commands.data",  # shards, build-tokenizer, tokenize
    "interleaf.commands.bpe",  # train-bpe
    "interleaf.commands.vqgan",  # train-vqgan
    "interleaf.commands.model",  # convert, info
    "interleaf.commands.training",  # train, export
    "interleaf.commands.sampling",  # generate, caption, draw
    "interleaf.commands.serve",  # serve
    "interleaf.commands.demo",  # eval, demo
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="interleaf", description="Train and run early-fusion multimodal models (text + VQ image tokens)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the DeepSpeed launcher passes --local_rank=N before the command; the env (LOCAL_RANK) has it too
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `interleaf` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after flags: `interleaf train cfg.yaml --quiet optim.lr=1e-3`
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):  # the commands that take overrides
        args.overrides.extend(late)
        extra = [a for a in extra if a not in late]
    if extra:
        parser.parse_args(argv)  # reports the unrecognised arguments the usual way (exit 2)
    setup_logging(args.verbose)
    try:
        status = args.func(args)
    except InterleafError as e:
        print(f"interleaf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interleaf {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # what the commands' own checks did not foresee: a full disk, a vanished file
        if args.verbose:
            traceback.print_exc()
        where = f": {e.filename}" if e.filename else ""
        print(f"interleaf {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
