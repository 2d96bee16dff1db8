"""`interleaf train-bpe`: train the byte-level BPE text tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-bpe",
        help="train a byte-level BPE text tokenizer",
        description=(
            "Train a byte-level BPE (16 special tokens at ids 0..15) from shards, text/JSONL files or "
            "the shapes world. Example: interleaf train-bpe configs/bpe/shapes-tiny.yaml out=runs/bpe"
        ),
    )
    p.add_argument("config", nargs="?", help="YAML config (configs/bpe/*.yaml); optional")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. vocab_size=8192 shapes.samples=1000")
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="text/JSONL file, directory, glob or shard pattern (repeatable; added to the config's)",
    )
    p.add_argument("--shapes", type=int, metavar="N", help="add N shapes-world samples to the corpus")
    p.add_argument("--vocab-size", type=int, metavar="N", help="target vocabulary size (specials included)")
    p.add_argument("-o", "--out", metavar="DIR", help="directory to write tokenizer.json and bpe.yaml into")
    p.set_defaults(func=train_bpe_command)


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A first positional that looks like `key=value` (and is no file) is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        return None, [config] + overrides
    return config, overrides


def train_bpe_command(args: argparse.Namespace) -> int:
    from interleaf.config import load_config
    from interleaf.data.corpus import BPEConfig, run_train_bpe

    config, overrides = _config_and_overrides(args)
    cfg = load_config(BPEConfig, config, overrides)
    # flags win over the config file and its overrides
    if args.vocab_size is not None:
        cfg.vocab_size = args.vocab_size
    if args.shapes is not None:
        cfg.shapes.samples = args.shapes
    if args.out is not None:
        cfg.out = args.out
    cfg.inputs = list(cfg.inputs) + list(args.input)
    cfg.validate()
    result = run_train_bpe(cfg)
    print(
        f"trained BPE: {result.vocab_size} tokens from {result.n_texts:,} texts "
        f"({result.n_chars:,} characters) in {result.seconds:.1f}s -> {result.path}"
    )
    return 0
