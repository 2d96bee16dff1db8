"""Text corpora for BPE training: shards, plain text, JSONL and the built-in shapes world.

`iter_corpus(cfg)` streams text from every source of a `BPEConfig`; nothing is loaded whole.
Inputs are dispatched by name:

    *.tar, brace patterns ("shards/{000..009}.tar")  -> text segments of interleaf shards
    *.jsonl, *.jsonl.gz                              -> the `jsonl_field` of every line
    anything else (*.txt, *.md, *.txt.gz, ...)       -> the file's lines
    a directory                                      -> its files of the kinds above, sorted
    glob patterns ("books/*.txt")                    -> every match
"""

from __future__ import annotations

import glob
import gzip
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from interleaf.config import save_config
from interleaf.data.shapes import ShapesWorld
from interleaf.errors import ConfigError, InterleafError
from interleaf.tokenizer.text import MIN_VOCAB, train_bpe
from interleaf.training.shards import iter_texts
from interleaf.utils import get_logger

log = get_logger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".txt.gz", ".jsonl.gz", ".tar")


@dataclass
class ShapesCorpus:
    """Texts of the built-in shapes world: per index a caption, a document's texts, a story."""

    samples: int = 0  # 0: not used
    seed: int = 0
    max_shapes: int = 3
    max_images: int = 4

    def validate(self) -> None:
        """BPEConfig.validate checks these."""


@dataclass
class BPEConfig:
    """`interleaf train-bpe`: what to train on, how big, where to write."""

    vocab_size: int = 4096
    min_frequency: int = 2
    inputs: list[str] = field(default_factory=list)
    jsonl_field: str = "text"
    max_texts: int = 0  # stop after this many texts (0: all)
    shapes: ShapesCorpus = field(default_factory=ShapesCorpus)
    out: str = ""

    def validate(self) -> None:
        if self.vocab_size < MIN_VOCAB:
            raise ConfigError(
                f"config key 'vocab_size': must be >= {MIN_VOCAB} (16 specials + 256 bytes), got {self.vocab_size}"
            )
        if self.min_frequency < 1:
            raise ConfigError(f"config key 'min_frequency': must be >= 1, got {self.min_frequency}")
        if self.max_texts < 0 or self.shapes.samples < 0:
            raise ConfigError("config keys 'max_texts' and 'shapes.samples' must be >= 0")


def _is_shards(name: str) -> bool:
    return name.endswith(".tar") or ("{" in name and ".tar" in name)


def _expand(pattern: str) -> list[str]:
    """One input -> concrete files (shard patterns stay as they are for the shard reader)."""
    if _is_shards(pattern) and not glob.has_magic(pattern):
        if "{" not in pattern and not Path(pattern).is_file():
            raise InterleafError(f"input not found: {pattern}")
        return [pattern]
    path = Path(pattern)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise InterleafError(f"no text, JSONL or shard files in directory {pattern}")
        return files
    if glob.has_magic(pattern):
        files = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise InterleafError(f"no files match {pattern}")
        return files
    if not path.is_file():
        raise InterleafError(f"input not found: {pattern}")
    return [pattern]


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", newline="")


def _iter_lines(path: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            yield from f
    except UnicodeDecodeError:
        raise InterleafError(f"{path} is not UTF-8 text") from None
    except (OSError, EOFError) as e:
        raise InterleafError(f"cannot read {path}: {e}") from None


def _segment_texts(segments: list) -> Iterator[str]:
    """Text of a document's segments: strings and {"text": ...} objects (images skipped)."""
    for seg in segments:
        if isinstance(seg, str):
            yield seg
        elif isinstance(seg, dict) and isinstance(seg.get("text"), str):
            yield seg["text"]


def _iter_jsonl(path: str, key: str) -> Iterator[str]:
    """Each line: {key: "text"}, or a document as `interleaf shards` reads it (a list of
    segments, or {"segments": [...]})."""
    for n, line in enumerate(_iter_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InterleafError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get(key), str):
            yield record[key]
        elif isinstance(record, dict) and isinstance(record.get("segments"), list):
            yield from _segment_texts(record["segments"])
        elif isinstance(record, list):
            yield from _segment_texts(record)


def _iter_shapes(cfg: ShapesCorpus) -> Iterator[str]:
    world = ShapesWorld(max_shapes=cfg.max_shapes, seed=cfg.seed, max_images=cfg.max_images)
    for i in range(cfg.samples):
        yield from world.texts(i)


def iter_source(name: str, jsonl_field: str = "text") -> Iterator[str]:
    """Texts of one input (file, directory, glob or shard pattern)."""
    for path in _expand(name):
        if _is_shards(path):
            yield from iter_texts(path)
        elif path.endswith((".jsonl", ".jsonl.gz")):
            yield from _iter_jsonl(path, jsonl_field)
        else:
            yield from _iter_lines(path)


def iter_corpus(cfg: BPEConfig) -> Iterator[str]:
    """Every text of the configured sources, in order, at most `max_texts`."""
    if not cfg.inputs and not cfg.shapes.samples:
        raise InterleafError("no training text: give inputs (files, directories, shards) or shapes.samples > 0")
    for name in cfg.inputs:  # fail on a bad path before a long run starts
        _expand(name)

    def texts():
        for name in cfg.inputs:
            yield from iter_source(name, cfg.jsonl_field)
        yield from _iter_shapes(cfg.shapes)

    return islice(texts(), cfg.max_texts) if cfg.max_texts else texts()


@dataclass
class BPEResult:
    path: Path
    vocab_size: int
    n_texts: int
    n_chars: int
    seconds: float


def run_train_bpe(cfg: BPEConfig, show_progress: bool = True) -> BPEResult:
    """Train the BPE of `cfg` and write `tokenizer.json` + the resolved `bpe.yaml` into `cfg.out`."""
    if not cfg.out:
        raise ConfigError("config key 'out' is required: the directory to write the tokenizer into")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InterleafError(f"output {out} exists and is not a directory")
    stats = {"texts": 0, "chars": 0}

    def counted():
        for text in tqdm(iter_corpus(cfg), desc="bpe corpus", unit=" texts", disable=None if show_progress else True):
            stats["texts"] += 1
            stats["chars"] += len(text)
            yield text

    start = time.perf_counter()
    tok = train_bpe(counted(), cfg.vocab_size, min_frequency=cfg.min_frequency)
    path = tok.save(out)
    save_config(cfg, out / "bpe.yaml")
    return BPEResult(path, tok.vocab_size, stats["texts"], stats["chars"], time.perf_counter() - start)
