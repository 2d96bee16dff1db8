"""`interleaf convert from-meta|from-hf|to-hf SRC DST` and `interleaf info CONFIG_OR_MODEL_DIR`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the model commands."""
    conv = subparsers.add_parser(
        "convert",
        help="convert Chameleon-family checkpoints (Meta release, Hugging Face) to and from model directories",
        description="Read Meta's release layout of Chameleon-7B/30B and Anole-7B (models/, tokenizer/), and read "
        "or write transformers' Chameleon format (config.json, *.safetensors, tokenizer.json).",
    )
    sub = conv.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    p = sub.add_parser(
        "from-meta",
        help="Meta's / Anole's release folder -> interleaf model directory",
        description="SRC: a release folder holding models/ and tokenizer/ (Meta's Chameleon, GAIR's "
        "Anole-7b-v0.1), or its model folder (models/7b: params.json, consolidated*.pth) with --tokenizer.",
    )
    p.add_argument("src", help="release folder, or its model folder")
    p.add_argument("dst", help="interleaf model directory to write")
    p.add_argument("--dtype", default=None, help="cast the transformer (bf16, fp32, fp16); default: as stored")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="text_tokenizer.json, vqgan.yaml, vqgan.ckpt")
    p.set_defaults(func=from_meta_command)
    p = sub.add_parser("from-hf", help="HF Chameleon directory -> interleaf model directory")
    p.add_argument("src", help="directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("dst", help="interleaf model directory to write")
    p.add_argument("--dtype", default=None, help="cast the transformer (float32, bfloat16, float16); default: keep")
    p.set_defaults(func=from_hf_command)
    p = sub.add_parser("to-hf", help="interleaf model directory -> HF Chameleon directory")
    p.add_argument("src", help="interleaf model directory")
    p.add_argument("dst", help="directory to write config.json, model.safetensors and tokenizer.json into")
    p.set_defaults(func=to_hf_command)

    from interleaf.model.args import MODEL_SIZES  # no torch: the parser stays quick to build

    info = subparsers.add_parser(
        "info",
        help="parameters, FLOPs per token and memory of a model config or directory; per-rank memory of a run",
        description="CONFIG_OR_MODEL_DIR: a configs/model/*.yaml file, a model directory or a named size "
        f"({', '.join(MODEL_SIZES)}). With --world N: what each of N training processes holds (parameters, "
        "gradients, optimizer state, activations with and without activation checkpointing) under ZeRO --zero, "
        "to size a job before queueing it.",
    )
    info.add_argument("target", metavar="CONFIG_OR_MODEL_DIR")
    info.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ModelArgs overrides, e.g. n_layers=8")
    info.add_argument("--seq-len", type=int, default=None, help="sequence length (default: max_seq_len)")
    info.add_argument("--world", type=int, default=None, metavar="N", help="memory per process of N processes")
    info.add_argument("--zero", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage of that run (default 3)")
    info.add_argument("--micro-batch", type=int, default=1, metavar="B", help="rows per forward (default 1)")
    info.add_argument(
        "--dtype", default="bf16", choices=("bf16", "fp32"), help="bf16 (GPU, the default) or fp32 (CPU) training"
    )
    info.set_defaults(func=info_command)


def from_meta_command(args: argparse.Namespace) -> int:
    from interleaf.model.meta import from_meta
    from interleaf.pipeline import parse_dtype, weight_files

    start = time.perf_counter()
    dtype = parse_dtype(args.dtype)
    dst = from_meta(args.src, args.dst, dtype=dtype, tokenizer=args.tokenizer)
    size = sum(f.stat().st_size for f in weight_files(dst))
    print(
        f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f}s "
        f"({size / 2**30:.2f} GiB of weights in {len(weight_files(dst))} file(s), VQ-GAN in float32)"
    )
    return 0


def from_hf_command(args: argparse.Namespace) -> int:
    from interleaf.model.convert import from_hf
    from interleaf.pipeline import parse_dtype

    start = time.perf_counter()
    dst = from_hf(args.src, args.dst, dtype=parse_dtype(args.dtype))
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f}s")
    return 0


def to_hf_command(args: argparse.Namespace) -> int:
    from interleaf.model.convert import to_hf

    start = time.perf_counter()
    dst = to_hf(args.src, args.dst)
    print(f"converted {args.src} -> {dst} in {time.perf_counter() - start:.1f}s")
    return 0


def info_command(args: argparse.Namespace) -> int:
    from interleaf.errors import InterleafError
    from interleaf.model.args import load_model_args, model_summary

    for flag, value in (("--seq-len", args.seq_len), ("--world", args.world), ("--micro-batch", args.micro_batch)):
        if value is not None and value < 1:
            raise InterleafError(f"{flag} must be >= 1, got {value}")
    margs = load_model_args(args.target, args.overrides)
    print(model_summary(margs, args.seq_len))
    directory = Path(args.target)
    if directory.is_dir():
        print(directory_summary(directory))
    if args.world is not None:
        print(run_memory(margs, args))
    return 0


def run_memory(margs, args: argparse.Namespace) -> str:
    """The per-process memory plan of a run, with the shipped DeepSpeed config's gradient bucket."""
    from interleaf.config import CONFIG_DIR
    from interleaf.training.engine import read_ds_json
    from interleaf.training.memory import format_plan, memory_plan

    flavour = "gpu-bf16" if args.dtype == "bf16" else "cpu-fp32"
    zero = read_ds_json(CONFIG_DIR / "deepspeed" / f"zero{args.zero}-{flavour}.json")["zero_optimization"]
    seq_len = args.seq_len or margs.max_seq_len
    plan = memory_plan(margs, args.world, args.zero, args.dtype, args.micro_batch, seq_len, zero)
    return format_plan(plan, args.world, args.zero, args.dtype, args.micro_batch, seq_len)


def directory_summary(directory: Path) -> str:
    """Vocabulary, tokenizer and sampling-default facts of a model directory."""
    from interleaf.tokenizer.vocab import Vocabulary

    lines = []
    if (directory / "vocab.json").is_file():
        v = Vocabulary.load(directory)
        lines.append(
            f"vocabulary: {v.size} ids, {v.n_codes} image codes, image grid {v.image_grid[0]}x{v.image_grid[1]} "
            f"({v.tokens_per_image} tokens per image)"
        )
    vq = directory / "vqgan" / "vqgan.yaml"
    if vq.is_file():
        from interleaf.config import read_yaml

        c = read_yaml(vq)  # facts only: VQModel.load validates the file when it is used
        if not isinstance(c.get("resolution"), int) or not isinstance(c.get("n_embed"), int):
            from interleaf.errors import InterleafError

            raise InterleafError(f"{vq} lacks the VQ-GAN's resolution or n_embed: it is not a VQ-GAN config")
        side = c.get("resolution", 0) // 2 ** (len(c.get("ch_mult", [1])) - 1)
        lines.append(
            f"vqgan: {c.get('resolution')}px -> {side}x{side} codes of {c.get('n_embed')}, "
            f"decoder {'yes' if c.get('has_decoder', True) else 'no (encoder only)'}"
        )
    else:
        lines.append("vqgan: none")
    from interleaf.pipeline import read_sampling_defaults

    sampling = read_sampling_defaults(directory)
    if sampling:
        lines.append("sampling defaults (sampling.yaml): " + ", ".join(f"{k} {v:g}" for k, v in sampling.items()))
    return "\n".join(lines)
