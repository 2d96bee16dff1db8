"""Offline tokenization: document shards -> token shards (text through BPE, images through the VQ-GAN once).

A token shard sample is `KEY.ids.npy` (int32 model ids of the whole document, `<bos>` ... `<eos>`)
plus `KEY.segs.npy` (int32 (n, 3) rows of (kind, start, end), kind 0 text / 1 image), see
shards.py. Each input shard becomes one or more output shards named after it, written by its own
worker process, so the work splits over processes without coordination and reruns are idempotent.
The output folder's `index.json` records the vocabulary; training refuses token shards made with
a different one.

A tokenizer directory holds `vocab.json` (optional: built from the text tokenizer and the VQ-GAN
when absent), the text tokenizer (`tokenizer/` or `tokenizer.json` / `spm.model` at the top) and
the VQ-GAN (`vqgan/`, optional for text-only data) - the same layout as an exported model.
`build_tokenizer_dir` (`interleaf build-tokenizer`) makes one from a BPE and a finished VQ-GAN run;
`tokenize`, `train` (`tokenizer:`) and `export` read it, and its parts must agree with its vocab.json.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from interleaf.config import read_yaml
from interleaf.errors import InterleafError
from interleaf.tokenizer.multimodal import MultimodalTokenizer
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import VOCAB_FILE, ImageCodes, Vocabulary
from interleaf.tokenizer.vqgan import CONFIG_FILE as VQGAN_CONFIG_FILE
from interleaf.tokenizer.vqgan import VQModel
from interleaf.tokenizer.vqgan_train import checkpoint_dirs, time_limit_note
from interleaf.training.shards import (
    INDEX_FILE,
    ReadStats,
    ShardWriter,
    expand_paths,
    iter_tar_samples,
    key_of,
    parse_document,
)
from interleaf.utils import atomic_dir, check_replaceable, get_logger, write_json

log = get_logger(__name__)

TEXT, IMAGE = 0, 1
TOKENS_FORMAT = "interleaf-tokens"


@dataclass
class TokenDoc:
    """A tokenized document: model ids (with <bos>/<eos>) and its segment table."""

    ids: np.ndarray  # int32 (L,)
    segs: np.ndarray  # int32 (n, 3): kind, start, end

    def members(self) -> dict[str, bytes]:
        return {"ids.npy": _npy(self.ids), "segs.npy": _npy(self.segs)}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADER = re.compile(rb"\{'descr': '([<|][iu][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def _load_npy(data: bytes, name: str) -> np.ndarray:
    """Parse .npy bytes; the common little-endian integer case without np.load's slow header eval."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        hlen = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.match(data[10 : 10 + hlen])
        if m is not None:
            shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
            count = math.prod(shape)
            dtype = np.dtype(m.group(1).decode())
            if len(data) - 10 - hlen == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=10 + hlen).reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InterleafError(f"{name}: not a valid .npy array ({e})") from None


def parse_token_doc(key: str, members: dict[str, bytes], vocab_size: int | None = None) -> TokenDoc:
    """Members of a token-shard sample -> TokenDoc; InterleafError if malformed."""
    if "ids.npy" not in members or "segs.npy" not in members:
        raise InterleafError(f"token sample {key}: needs {key}.ids.npy and {key}.segs.npy")
    ids = _load_npy(members["ids.npy"], f"{key}.ids.npy")
    segs = _load_npy(members["segs.npy"], f"{key}.segs.npy")
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or segs.ndim != 2 or segs.shape[1] != 3:
        raise InterleafError(f"token sample {key}: wrong array shapes {ids.shape} / {segs.shape}")
    if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
        raise InterleafError(f"token sample {key}: ids outside [0, {vocab_size})")
    if any(not (0 <= s <= e <= len(ids)) or k not in (TEXT, IMAGE) for k, s, e in segs.tolist()):
        raise InterleafError(f"token sample {key}: segment table out of range")
    return TokenDoc(ids.astype(np.int32, copy=False), segs.astype(np.int32, copy=False))


# ---- tokenizer directory ------------------------------------------------------------------
TOKENIZER_PARTS = {VOCAB_FILE, "tokenizer", "vqgan"}  # what build_tokenizer_dir writes


@dataclass
class TokenizerFiles:
    """The vocabulary, text tokenizer and (optional) VQ-GAN of a tokenizer directory."""

    directory: Path
    vocab: Vocabulary
    text: TextTokenizer
    vqgan: VQModel | None

    def multimodal(self) -> MultimodalTokenizer:
        return MultimodalTokenizer(self.vocab, self.text, self.vqgan)


def load_tokenizer_dir(directory: str | Path, device: str = "cpu") -> TokenizerFiles:
    """Read a tokenizer directory (see module docstring); one clear error for a missing or mismatched part."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InterleafError(f"tokenizer directory not found: {directory}")
    text_src = directory / "tokenizer" if (directory / "tokenizer").exists() else directory
    text = TextTokenizer.load(text_src)
    vqgan = VQModel.load(directory / "vqgan", device=device) if (directory / "vqgan").is_dir() else None
    if (directory / VOCAB_FILE).is_file():
        vocab = Vocabulary.load(directory)
    elif vqgan is not None:
        vocab = Vocabulary.build(text.vocab_size, vqgan.config.n_embed, vqgan.grid)
    else:
        raise InterleafError(f"tokenizer directory {directory} has neither vocab.json nor vqgan/ to build one")
    files = TokenizerFiles(directory, vocab, text, vqgan)
    try:
        files.multimodal()  # the text tokenizer and VQ-GAN fit the vocabulary (a vocab.json of other parts fails)
    except InterleafError as e:
        raise InterleafError(
            f"tokenizer directory {directory}: {e}; rebuild it with `interleaf build-tokenizer`"
        ) from None
    return files


def vqgan_model_dir(path: str | Path) -> Path:
    """The VQ-GAN folder (vqgan.yaml + vqgan.safetensors) of a finished `train-vqgan` run, or `path` if it is one."""
    path = Path(path)
    for folder in (path, path / "vqgan"):
        if (folder / VQGAN_CONFIG_FILE).is_file():
            return folder
    if not path.is_dir():
        raise InterleafError(f"VQ-GAN run not found: {path}")
    ckpts = checkpoint_dirs(path)
    if ckpts:
        steps = read_yaml(ckpts[-1] / "config.yaml")["steps"]
        step = int(ckpts[-1].name.split("_")[1])
        raise InterleafError(
            f"VQ-GAN run {path} has not finished (last checkpoint: step {step} of {steps}, no vqgan/ folder yet): "
            f"finish it with `interleaf train-vqgan {path / 'config.yaml'} --resume`"
        )
    raise InterleafError(
        f"{path} is neither a VQ-GAN run (the run_dir of `interleaf train-vqgan`) nor a VQ-GAN folder "
        f"({VQGAN_CONFIG_FILE} + weights)"
    )


def build_tokenizer_dir(bpe: str | Path, vqgan: str | Path, out: str | Path) -> TokenizerFiles:
    """A tokenizer directory in `out` from a BPE (train-bpe's folder or file) and a VQ-GAN (run or folder).

    Writes `tokenizer/`, `vqgan/` and the vocabulary both share (`vocab.json`); `out` is built under a
    temporary name and replaces an earlier tokenizer directory as a whole.
    """
    text = TextTokenizer.load(bpe)
    vq_dir = vqgan_model_dir(vqgan)
    vq = VQModel.load(vq_dir)
    vocab = Vocabulary.build(text.vocab_size, vq.config.n_embed, vq.grid)
    folder = check_replaceable(out, "output folder")
    if folder.is_dir() and not {p.name for p in folder.iterdir()} <= TOKENIZER_PARTS:
        raise InterleafError(f"output folder {out} holds more than a tokenizer directory: choose an empty or new one")
    for given in (bpe, vq_dir):
        if folder == Path(given).resolve() or folder in Path(given).resolve().parents:
            raise InterleafError(f"output folder {out} holds the input {given}: write somewhere else")
    run_metrics = vq_dir.parent / "metrics.json"  # a train-vqgan run's final metrics, beside its vqgan/
    if vq_dir.name == "vqgan" and run_metrics.is_file():
        note = time_limit_note(json.loads(run_metrics.read_text()))
        if note:
            log.warning("the VQ-GAN of %s %s", vq_dir.parent, note)
    with atomic_dir(out, "output folder") as tmp:
        (tmp / "tokenizer").mkdir()
        text.save(tmp / "tokenizer")
        vq.save(tmp / "vqgan")
        vocab.save(tmp)
    return TokenizerFiles(Path(out), vocab, text, vq)


def encode_document(segments: Sequence, tok) -> TokenDoc:
    """Segments (str | PIL image | ImageCodes) -> TokenDoc, through a MultimodalTokenizer."""
    segs = tok.segments(list(segments))  # images -> ImageCodes, batched through the VQ-GAN
    ids, table = [tok.vocab.bos_id], []
    for seg in segs:
        part = tok.vocab.encode_document([seg], tok.text.encode, bos=False, eos=False)
        if not part:
            continue
        table.append((IMAGE if isinstance(seg, ImageCodes) else TEXT, len(ids), len(ids) + len(part)))
        ids.extend(part)
    ids.append(tok.vocab.eos_id)
    return TokenDoc(np.asarray(ids, dtype=np.int32), np.asarray(table, dtype=np.int32).reshape(-1, 3))


def encode_documents(docs: Sequence[Sequence], tok) -> list[TokenDoc]:
    """Several documents at once: all their images go through the VQ-GAN in shared batches."""
    images = [seg for doc in docs for seg in doc if isinstance(seg, (Image.Image, Path))]
    codes = iter(tok.encode_images(images)) if images else iter(())
    out = []
    for doc in docs:
        segments = [next(codes) if isinstance(seg, (Image.Image, Path)) else seg for seg in doc]
        out.append(encode_document(segments, tok))
    return out


# ---- tokenize shards ----------------------------------------------------------------------
_WORKER: dict = {}


def _worker_init(tokenizer_dir: str, device: str, counter) -> None:
    torch.set_num_threads(1)
    files = load_tokenizer_dir(tokenizer_dir, device=device)

    def report(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _WORKER.update(tok=files.multimodal(), report=report)


def _tokenize_one(task: tuple[str, str, str, int, int, int]) -> dict:
    """Tokenize one document shard into token shards named `prefix-*.tar`; returns its counts."""
    src, out_dir, prefix, max_size, max_count, chunk = task
    tok, report = _WORKER["tok"], _WORKER["report"]
    stats, n_docs, n_tokens, n_image = ReadStats(), 0, 0, 0
    writer = ShardWriter(out_dir, prefix=prefix, max_size=max_size, max_count=max_count)
    pending: list[tuple[str, list]] = []

    def flush():
        nonlocal n_docs, n_tokens, n_image
        for (key, _), doc in zip(pending, encode_documents([d for _, d in pending], tok)):
            writer.write(key, doc.members())
            n_docs += 1
            n_tokens += len(doc.ids)
            n_image += int(sum(e - s for k, s, e in doc.segs if k == IMAGE))
        report(len(pending))
        pending.clear()

    try:
        for key, members in iter_tar_samples(src, stats):
            stats.samples += 1
            try:
                pending.append((key_of(key), parse_document(key_of(key), members)))
            except InterleafError as e:
                kind = "bad_images" if str(e).startswith("cannot read image") else "bad_samples"
                stats.warn(kind, f"{src}: {e}")
            if len(pending) >= chunk:
                flush()
        flush()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {
        "shards": writer.shards,
        "documents": n_docs,
        "tokens": n_tokens,
        "image_tokens": n_image,
        "stats": stats.to_dict(),
    }


def tokenize_shards(
    inputs,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    workers: int = 0,
    device: str = "cpu",
    max_size: int = 256 << 20,
    max_count: int = 10_000,
    chunk: int = 64,
    progress: bool = True,
) -> dict:
    """Document shards -> token shards in `out_dir` (one worker process per input shard at a time)."""
    paths = expand_paths(inputs)
    files = load_tokenizer_dir(tokenizer_dir, device=device)  # fail early, before any worker starts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(p, str(out_dir), prefix, max_size, max_count, chunk) for p, prefix in zip(paths, _prefixes(paths))]
    total = _count_hint(paths)
    t0 = time.time()
    results = _run_tasks(tasks, str(tokenizer_dir), files, workers, device, total, progress)
    shards = [
        s for r in sorted(results, key=lambda r: r["shards"][0]["path"] if r["shards"] else "") for s in r["shards"]
    ]
    summary = {
        "format": TOKENS_FORMAT,
        "version": 1,
        "vocab": files.vocab.to_dict(),
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "documents": sum(r["documents"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "image_tokens": sum(r["image_tokens"] for r in results),
        "skipped": {k: sum(r["stats"][k] for r in results) for k in ("bad_shards", "bad_samples", "bad_images")},
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out_dir / INDEX_FILE, {"shards": shards, "samples": summary["documents"], **summary})
    return summary


def _prefixes(paths: list[str]) -> list[str]:
    """Output names: each input shard's file stem, or part-NNNNNN when stems are not unique (URLs, pipes)."""
    stems = [re.sub(r"[^A-Za-z0-9_\-]", "_", Path(p.rstrip(" -")).name.split(".")[0]) for p in paths]
    if len(set(stems)) == len(stems) and all(stems):
        return stems
    return [f"part-{i:06d}" for i in range(len(paths))]


def _count_hint(paths: list[str]) -> int | None:
    """Total documents from the inputs' index.json files, when every input folder has one."""
    total = 0
    for folder in {str(Path(p).parent) for p in paths}:
        index = Path(folder) / INDEX_FILE
        if not index.is_file():
            return None
        try:
            total += int(json.loads(index.read_text()).get("samples", 0))
        except (ValueError, json.JSONDecodeError):
            return None
    return total or None


def _run_tasks(tasks, tokenizer_dir, files, workers, device, total, progress) -> list[dict]:
    bar = tqdm(total=total, unit="doc", desc="tokenize", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 0:
            _WORKER.update(tok=files.multimodal(), report=bar.update)
            return [_tokenize_one(t) for t in tasks]
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(
            min(workers, len(tasks)), initializer=_worker_init, initargs=(tokenizer_dir, device, counter)
        ) as pool:
            pending = pool.map_async(_tokenize_one, tasks, chunksize=1)
            while not pending.ready():
                pending.wait(0.5)
                bar.update(counter.value - bar.n)
            results = pending.get()
            bar.update(counter.value - bar.n)
            return results
    finally:
        bar.close()
