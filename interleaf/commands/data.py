"""`interleaf shards` (write document shards), `interleaf build-tokenizer` (BPE + VQ-GAN -> a tokenizer
directory) and `interleaf tokenize` (document -> token shards)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from interleaf.errors import InterleafError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def parse_size(text: str) -> int:
    """'256MB', '1G', '4096' -> bytes."""
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise InterleafError(f"cannot read size {text!r} (e.g. 256MB, 1G, 4096)") from None
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise InterleafError(f"cannot read size {text!r} (e.g. 256MB, 1G, 4096)")
    return int(value * _UNITS[unit])


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shards",
        help="write webdataset document shards from images+captions, JSONL, text files or the shapes world",
        description="Write size-limited tar shards, one document per sample (KEY.json segments + image files).",
    )
    p.add_argument(
        "source",
        choices=["folder", "jsonl", "text", "shapes"],
        help="folder: x.png + x.txt pairs; jsonl: interleaved documents with image paths; "
        "text: plain text files; shapes: the built-in shapes world",
    )
    p.add_argument("inputs", nargs="*", help="the folder, the JSONL file, or the text files")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--max-size", default="256MB", help="bytes per shard (default 256MB)")
    p.add_argument("--max-count", type=int, default=10_000, help="documents per shard (default 10000)")
    p.add_argument("--per-line", action="store_true", help="text: one document per non-empty line")
    p.add_argument("--count", type=int, default=1000, help="shapes: number of documents")
    p.add_argument(
        "--kind", default="mix", choices=["pairs", "documents", "text", "mix"], help="shapes: which documents"
    )
    p.add_argument("--resolution", type=int, default=64, help="shapes: image size in pixels")
    p.add_argument("--max-shapes", type=int, default=3, help="shapes: shapes per scene")
    p.add_argument("--seed", type=int, default=0, help="shapes: world seed")
    p.add_argument("--start", type=int, default=0, help="shapes: first scene index (held-out sets use another range)")
    p.set_defaults(func=shards_command)

    p = subparsers.add_parser(
        "build-tokenizer",
        help="put a BPE and a VQ-GAN into one tokenizer directory with their shared vocabulary",
        description="Write a tokenizer directory (vocab.json, tokenizer/, vqgan/) from the output of train-bpe and "
        "a finished train-vqgan run: what `tokenize --tokenizer`, `train tokenizer=...` and `export --tokenizer` read.",
    )
    p.add_argument(
        "--bpe", required=True, metavar="DIR", help="train-bpe's output folder (or a tokenizer.json / .model)"
    )
    p.add_argument(
        "--vqgan", required=True, metavar="DIR", help="a finished train-vqgan run folder (or its vqgan/ model folder)"
    )
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="the tokenizer directory to write")
    p.set_defaults(func=build_tokenizer_command)

    p = subparsers.add_parser(
        "tokenize",
        help="turn document shards into token shards (BPE + VQ-GAN once, offline)",
        description="Tokenize document shards with a tokenizer directory (vocab.json, tokenizer/, vqgan/: "
        "`interleaf build-tokenizer` makes one); one worker process per shard at a time.",
    )
    p.add_argument("inputs", nargs="+", help="document shards: files, globs, brace patterns or folders")
    p.add_argument("-o", "--out", required=True, help="output folder for token shards")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer directory (from build-tokenizer, or a model directory)"
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    p.add_argument("--device", default="cpu", help="device for the VQ-GAN (cpu, cuda)")
    p.add_argument("--max-size", default="256MB", help="bytes per output shard")
    p.add_argument("--max-count", type=int, default=10_000, help="documents per output shard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=tokenize_command)


def _documents(args):
    from interleaf.training import shards as sh

    if args.source == "shapes":
        if args.inputs:
            raise InterleafError("shapes takes no inputs (use --count, --kind, --resolution)")
        return sh.shapes_documents(
            args.count, args.kind, args.resolution, args.seed, args.max_shapes, args.start
        ), args.count
    if not args.inputs:
        raise InterleafError(f"{args.source}: give the input path(s)")
    seen: dict[Path, str] = {}
    for p in args.inputs:
        real = Path(p).resolve()
        if real in seen:
            raise InterleafError(f"input {p} is given twice" + (f" (also as {seen[real]})" if seen[real] != p else ""))
        seen[real] = p
    if args.source == "folder":
        if len(args.inputs) != 1:
            raise InterleafError("folder takes one folder of image + caption pairs")
        docs = sh.folder_pairs(args.inputs[0])
    elif args.source == "jsonl":
        names = sh.file_keys([Path(p) for p in args.inputs])  # a/train.jsonl, b/train.jsonl: path-based
        docs = [d for p in args.inputs for d in sh.jsonl_documents(p, names[Path(p)])]
    else:
        docs = sh.text_documents(args.inputs, per_line=args.per_line)
    sh.check_unique_keys(docs)
    return docs, len(docs)


def check_shards_output(out: str, inputs=(), prefix: str | None = None) -> None:
    """An output folder for shards: new, empty or an earlier one (its index.json), which is replaced
    as a whole once the new shards are complete; never a folder the inputs are read from."""
    from interleaf.training.shards import INDEX_FILE
    from interleaf.utils import check_replaceable

    folder = check_replaceable(out, "output folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / INDEX_FILE).is_file():
            raise InterleafError(
                f"output folder {out} holds other files (no {INDEX_FILE}): choose an empty or new folder"
            )
        listed = {s.get("path") for s in _index_shards(folder / INDEX_FILE)}
        unlisted = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
        if unlisted:  # e.g. another --prefix's shards: replacing the folder would delete them
            raise InterleafError(
                f"output folder {out} holds shards its {INDEX_FILE} does not list ({unlisted[0]}): "
                "choose another folder"
            )
        others = sorted(n for n in listed if prefix is not None and n and not n.startswith(f"{prefix}-"))
        if others:  # an earlier run with another --prefix: it meant to add, replacing would delete
            raise InterleafError(
                f"output folder {out} holds shards of another --prefix ({others[0]}); replacing "
                "the folder would delete them: choose another folder"
            )
    for p in inputs:
        if folder == Path(p).resolve() or folder in Path(p).resolve().parents:
            raise InterleafError(f"output folder {out} holds the input {p}: write somewhere else")


def _index_shards(path: Path) -> list[dict]:
    import json

    try:
        shards = json.loads(path.read_text(encoding="utf-8")).get("shards", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in shards if isinstance(s, dict)] if isinstance(shards, list) else []


def shards_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from interleaf.training.shards import write_documents
    from interleaf.utils import atomic_dir

    max_size = parse_size(args.max_size)
    if args.max_count <= 0:
        raise InterleafError("--max-count must be positive")
    check_shards_output(args.out, args.inputs, args.prefix)
    docs, total = _documents(args)  # every input is checked here, before a shard is written
    with (
        tqdm(total=total, unit="doc", desc="shards", dynamic_ncols=True) as bar,
        atomic_dir(args.out, "output folder") as tmp,
    ):
        paths = write_documents(
            docs,
            tmp,
            prefix=args.prefix,
            max_size=max_size,
            max_count=args.max_count,
            meta={"source": args.source},
            progress=bar.update,
        )
    print(f"wrote {total} documents into {len(paths)} shard(s) in {args.out}")
    return 0


def build_tokenizer_command(args: argparse.Namespace) -> int:
    from interleaf.training.tokenize import build_tokenizer_dir

    files = build_tokenizer_dir(args.bpe, args.vqgan, args.out)
    v = files.vocab
    print(
        f"tokenizer directory {args.out}: {files.text.vocab_size} text ids + {v.n_codes} image codes "
        f"({v.image_grid[0]}x{v.image_grid[1]} per image) in a vocabulary of {v.size} ids"
    )
    return 0


def tokenize_command(args: argparse.Namespace) -> int:
    from interleaf.pipeline import check_device
    from interleaf.training.shards import expand_paths, is_url
    from interleaf.training.tokenize import tokenize_shards
    from interleaf.utils import atomic_dir

    max_size = parse_size(args.max_size)
    check_device(args.device, "--device")
    check_shards_output(args.out, [p for p in expand_paths(args.inputs) if not is_url(p)])
    with atomic_dir(args.out, "output folder") as tmp:
        s = tokenize_shards(
            args.inputs,
            tmp,
            args.tokenizer,
            workers=args.workers,
            device=args.device,
            max_size=max_size,
            max_count=args.max_count,
            progress=not args.quiet,
        )
        bad = ", ".join(f"{v} {k.replace('bad_', 'bad ')}" for k, v in s["skipped"].items() if v)
        if not s["documents"]:
            raise InterleafError(f"no document could be tokenized{f' ({bad})' if bad else ''}: nothing written")
    skipped = bad or "nothing"
    print(
        f"tokenized {s['documents']} documents, {s['tokens']:,} tokens ({s['image_tokens']:,} image) "
        f"in {s['seconds']}s into {args.out}; skipped {skipped}"
    )
    return 0
