"""`interleaf train-vqgan CONFIG [a.b=c ...] [--resume]`: train a VQ-GAN image tokenizer."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the VQ-GAN commands."""
    p = subparsers.add_parser(
        "train-vqgan",
        help="train a VQ-GAN image tokenizer",
        description=(
            "Train a VQ-GAN (encoder / quantizer / decoder + PatchGAN) from a YAML config "
            "(configs/vqgan/*.yaml) with dotted overrides. Writes checkpoints, metrics.jsonl, "
            "metrics.json (validation PSNR, codebook usage, perplexity) and the final model "
            "(RUN_DIR/vqgan) into the config's run_dir."
        ),
    )
    p.add_argument("config", help="YAML config file, e.g. configs/vqgan/shapes-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. steps=200 run_dir=runs/vq")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=train_vqgan_command)


def train_vqgan_command(args: argparse.Namespace) -> int:
    """Load the config, train, print the summary line."""
    from interleaf.tokenizer.vqgan_train import format_summary, load_train_config, train_vqgan

    cfg = load_train_config(args.config, args.overrides)
    result = train_vqgan(cfg, resume=args.resume, progress=not args.no_progress)
    print(format_summary(result, cfg.run_dir))
    return 0
