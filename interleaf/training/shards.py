"""Shard format, writer and reader.

Shards are webdataset tar files. One sample is one document; its members share a key (the file
name up to the first dot, as webdataset groups them):

    KEY.json        the document: a JSON list of segments, each {"text": "..."} or
                    {"image": "0.png"} where "0.png" names the member KEY.0.png
    KEY.0.png       image files (any format PIL reads: .png, .jpg, .webp, ...)
    KEY.meta.json   optional metadata (ignored by training; e.g. the shapes world's scenes)

Token shards (written by `interleaf tokenize`, see `interleaf/training/tokenize.py`) hold

    KEY.ids.npy     int32 (L,): the whole document as model ids, <bos> ... <eos>
    KEY.segs.npy    int32 (n, 3): one row per segment, (kind, start, end) into ids; kind 0 is
                    text, 1 is an image (the span covers <boi> codes <eoi>)

and an `index.json` beside them with the vocabulary they were made with.

Writing goes through `webdataset.TarWriter` with fixed header fields, so the same input gives
byte-identical shards; each shard is written under a temporary name and renamed when complete,
and a shard is closed once it reaches `max_size` bytes or `max_count` samples.

Reading is a small sequential tar reader (checksummed headers; several times faster than
`tarfile` on many small members) over `webdataset.gopen` for URLs (`pipe:` commands, http/https)
or plain files: a deterministic sequence of samples whose index inside a shard is stable, which
is what the resumable loader (loader.py) needs to own its position. A truncated or corrupt shard
ends with a warning after its last complete sample and is counted in `ReadStats`;
a sample that cannot be decoded is skipped the same way.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from interleaf.data.shapes import ShapesWorld
from interleaf.errors import InterleafError
from interleaf.tokenizer.image import image_problem
from interleaf.utils import get_logger, write_json

log = get_logger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INDEX_FILE = "index.json"
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


# ---- reading statistics --------------------------------------------------------------------
@dataclass
class ReadStats:
    """Counts of what was skipped while reading; shared by readers, loader and tokenizer."""

    samples: int = 0
    bad_shards: int = 0
    bad_samples: int = 0
    bad_images: int = 0
    problems: list[str] = field(default_factory=list)

    def warn(self, kind: str, message: str) -> None:
        """Count one problem of `kind` ('bad_shards', 'bad_samples', 'bad_images') and log it."""
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 100:
            self.problems.append(message)
        log.warning("%s (skipped)", message)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "bad_shards": self.bad_shards,
            "bad_samples": self.bad_samples,
            "bad_images": self.bad_images,
        }

    def load(self, d: dict) -> None:
        for k in ("samples", "bad_shards", "bad_samples", "bad_images"):
            setattr(self, k, int(d.get(k, 0)))


# ---- paths ---------------------------------------------------------------------------------
def is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def expand_paths(pattern_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Brace patterns, globs, directories (their *.tar) and URLs -> sorted list of shard paths."""
    items = [pattern_or_paths] if isinstance(pattern_or_paths, (str, os.PathLike)) else list(pattern_or_paths)
    if not items:
        raise InterleafError("no shard paths given")
    out: list[str] = []
    for item in items:
        for pattern in braceexpand.braceexpand(str(item)):
            if is_url(pattern):
                out.append(pattern)
            elif Path(pattern).is_dir():
                found = sorted(glob.glob(os.path.join(pattern, "*.tar")))
                if not found:
                    raise InterleafError(f"no .tar shards in directory {pattern}")
                out.extend(found)
            elif glob.has_magic(pattern):
                found = sorted(glob.glob(pattern))
                if not found:
                    raise InterleafError(f"no shards match {pattern!r}")
                out.extend(found)
            elif Path(pattern).is_file():
                out.append(pattern)
            else:
                raise InterleafError(f"shard not found: {pattern}")
    return out


def _open(path: str):
    if is_url(path):
        return wds.gopen(path, "rb")
    return open(path, "rb", buffering=1 << 20)


# ---- raw tar samples -----------------------------------------------------------------------
class CorruptShard(Exception):
    """A tar stream that ends early or holds a damaged header."""


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CorruptShard(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    return int(field or b"0", 8)


def iter_tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar stream, in order.

    A minimal reader (ustar, GNU long names, pax path records) that checks every header's checksum:
    several times faster than `tarfile` for many small members, which is what shards hold.
    """
    long_name = None
    while True:
        header = f.read(512)
        if header == bytes(512):
            return  # end-of-archive marker
        if len(header) == 0:
            raise CorruptShard("archive ends without its end marker (truncated?)")
        if len(header) < 512:
            raise CorruptShard("truncated header")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise CorruptShard("bad header checksum")
        size = _octal(header[124:136])
        kind = header[156:157]
        data = _read_exact(f, size)
        if size % 512:
            _read_exact(f, 512 - size % 512)
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):
            for rec in data.decode("utf-8", "replace").split("\n"):
                _, _, kv = rec.partition(" ")
                if kv.startswith("path=") and kind == b"x":
                    long_name = kv[5:]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0")
            if header[257:262] == b"ustar" and prefix:
                name = prefix.decode("utf-8", "replace") + "/" + name
        yield name, data


def _open_stream(path: str):
    """A binary stream over a shard (.tar.gz / .tgz decompressed)."""
    f = _open(path)
    return gzip.GzipFile(fileobj=f) if path.endswith((".gz", ".tgz")) else f


def iter_tar_samples(path: str, stats: ReadStats | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of one shard, in file order; corruption ends it with a warning."""
    stats = stats if stats is not None else ReadStats()
    n = 0
    key, members = None, {}
    try:
        with _open_stream(path) as f:
            for name, data in iter_tar_members(f):
                m = _KEY_RE.match(name)
                if m is None:
                    continue
                k, ext = m.group(1), m.group(2)
                if k != key and key is not None:
                    n += 1
                    yield key, members
                    members = {}
                key = k
                members[ext] = data
    except (CorruptShard, EOFError, OSError, zlib.error, ValueError) as e:
        stats.warn("bad_shards", f"shard {path}: truncated or corrupt after {n} samples ({e})")
        return
    if key is not None:
        yield key, members


def key_of(key: str) -> str:
    """The document key without the directory part webdataset keeps in tar member names."""
    return key.rsplit("/", 1)[-1]


# ---- documents -----------------------------------------------------------------------------
def parse_document(key: str, members: dict[str, bytes], load_images: bool = True) -> list:
    """Members of one document sample -> segments (str | PIL.Image); InterleafError if malformed."""
    if "json" not in members:
        raise InterleafError(f"document {key}: no {key}.json member")
    try:
        doc = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InterleafError(f"document {key}: JSON is malformed ({e})") from None
    if not isinstance(doc, list) or not doc:
        raise InterleafError(f"document {key}: JSON must be a non-empty list of segments")
    out: list = []
    for i, seg in enumerate(doc):
        if isinstance(seg, dict) and isinstance(seg.get("text"), str) and len(seg) == 1:
            out.append(seg["text"])
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str) and len(seg) == 1:
            ext = seg["image"]
            if ext not in members:
                raise InterleafError(f"document {key}: segment {i} names image {ext!r}, which the sample lacks")
            out.append(decode_image(members[ext], f"{key}.{ext}") if load_images else members[ext])
        else:
            raise InterleafError(f"document {key}: segment {i} must be {{'text': str}} or {{'image': name}}")
    return out


def decode_image(data: bytes, name: str):
    """Bytes -> PIL image (fully loaded), InterleafError if undecodable."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InterleafError(f"cannot read image {name}: {_image_problem(e)}") from None


def _image_problem(e: Exception) -> str:
    """What PIL found wrong in image bytes (its own message would name the in-memory file)."""
    return image_problem(e, "not an image format PIL reads")


def iter_documents(pattern_or_paths, stats: ReadStats | None = None) -> Iterator[tuple[str, list]]:
    """(key, segments) of every document in document shards; bad samples are skipped and counted."""
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(pattern_or_paths):
        for key, members in iter_tar_samples(path, stats):
            stats.samples += 1
            try:
                yield key_of(key), parse_document(key_of(key), members)
            except InterleafError as e:
                kind = "bad_images" if str(e).startswith("cannot read image") else "bad_samples"
                stats.warn(kind, f"{path}: {e}")


def iter_texts(pattern_or_paths, stats: ReadStats | None = None) -> Iterator[str]:
    """Text segments of every document in document shards (images are not decoded)."""
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(pattern_or_paths):
        for key, members in iter_tar_samples(path, stats):
            try:
                segments = parse_document(key_of(key), members, load_images=False)
            except InterleafError as e:
                stats.warn("bad_samples", f"{path}: {e}")
                continue
            yield from (s for s in segments if isinstance(s, str))


# ---- writing -------------------------------------------------------------------------------
def sanitize_key(key: str) -> str:
    """A webdataset key: no dots or slashes (they would split the sample)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    if not key:
        raise InterleafError("empty document key")
    return key


def image_bytes(image, ext: str = "png") -> tuple[bytes, str]:
    """A PIL image, a path or raw bytes -> (encoded bytes, extension)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if isinstance(image, (str, Path)):
        p = Path(image)
        if not p.is_file():
            raise InterleafError(f"image not found: {p}")
        suffix = p.suffix.lower()
        if suffix not in IMAGE_EXTS:
            raise InterleafError(f"{p}: not an image file (extension {suffix or 'missing'})")
        data = p.read_bytes()
        try:  # the header and structure, without decoding every pixel: tokenize decodes it once
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:
            raise InterleafError(f"{p}: not a readable image ({_image_problem(e)})") from None
        return data, suffix[1:]
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), ext
    raise InterleafError(f"cannot store an image of type {type(image).__name__}")


def document_members(segments: Sequence, meta: Any = None) -> dict[str, bytes]:
    """Segments (str | PIL.Image | image path) -> the members of one shard sample (without key)."""
    doc, members, n_images = [], {}, 0
    for seg in segments:
        if isinstance(seg, str):
            doc.append({"text": seg})
        else:
            data, ext = image_bytes(seg)
            name = f"{n_images}.{ext}"
            members[name] = data
            doc.append({"image": name})
            n_images += 1
    if not doc:
        raise InterleafError("a document needs at least one segment")
    members["json"] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    if meta is not None:
        members["meta.json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return members


class ShardWriter:
    """Write samples into size-limited tar shards `{prefix}-{i:06d}.tar`, each renamed into place when complete."""

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        max_size: int = 256 << 20,
        max_count: int = 10_000,
        start_index: int = 0,
    ):
        if max_size <= 0 or max_count <= 0:
            raise InterleafError("shard max_size and max_count must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_size, self.max_count = prefix, max_size, max_count
        self.index = start_index
        self.shards: list[dict] = []  # {"path", "count", "bytes"}
        self._writer = self._file = self._tmp = None
        self._count = self._size = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        final = self.out_dir / f"{self.prefix}-{self.index:06d}.tar"
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0, user="", group="", mode=0o444)
        self._count = self._size = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.out_dir / f"{self.prefix}-{self.index:06d}.tar"
        os.replace(self._tmp, final)
        self.shards.append({"path": final.name, "count": self._count, "bytes": final.stat().st_size})
        self._writer = self._file = self._tmp = None
        self.index += 1

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample; starts a new shard first if this one would exceed its limits."""
        key = sanitize_key(key)
        if key in self._keys:
            raise InterleafError(f"duplicate document key {key!r}")
        self._keys.add(key)
        size = sum(len(v) + 1024 for v in members.values())  # + tar header and padding
        if self._writer is not None and (self._count >= self.max_count or self._size + size > self.max_size):
            self._close_shard()
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, **members})
        self._count += 1
        self._size += size

    def finish(self) -> list[Path]:
        """Finish the last shard (no index.json: for writers that share a folder)."""
        self._close_shard()
        return [self.out_dir / s["path"] for s in self.shards]

    def close(self, meta: dict | None = None) -> list[Path]:
        """Finish the last shard and write `index.json` (shards, counts, `meta`)."""
        self._close_shard()
        index = {"shards": self.shards, "samples": sum(s["count"] for s in self.shards), **(meta or {})}
        write_json(self.out_dir / INDEX_FILE, index)
        return [self.out_dir / s["path"] for s in self.shards]

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()  # else its stream's finaliser writes to the closed file
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def write_documents(
    docs: Iterable[tuple[str, Sequence, Any]],
    out_dir: str | Path,
    prefix: str = "shard",
    max_size: int = 256 << 20,
    max_count: int = 10_000,
    meta: dict | None = None,
    progress: Callable | None = None,
) -> list[Path]:
    """(key, segments, meta) documents -> document shards in `out_dir`; returns the shard paths."""
    with ShardWriter(out_dir, prefix, max_size, max_count) as writer:
        for key, segments, doc_meta in docs:
            writer.write(key, document_members(segments, doc_meta))
            if progress is not None:
                progress(1)
        return writer.close(meta)


# ---- sources for `interleaf shards` --------------------------------------------------------
def folder_pairs(folder: str | Path) -> list[tuple[str, list, None]]:
    """x.png + x.txt pairs of a folder -> documents [caption, image]; images without caption are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InterleafError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise InterleafError(f"no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise InterleafError(
            f"{len(missing)} image(s) in {folder} have no caption file, e.g. {missing[0]} "
            f"(expected {Path(missing[0]).stem}.txt)"
        )
    return [(p.stem, [_utf8_text(p.with_suffix(".txt")).strip(), p], None) for p in images]


def _utf8_text(path: Path) -> str:
    """An input text file's contents; one that is not UTF-8 is an InterleafError saying where."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InterleafError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_documents(path: str | Path, name: str | None = None) -> list[tuple[str, list, Any]]:
    """A JSONL file of documents -> (key, segments, meta); every line is checked before any shard is written.

    Each line is a list of segments or {"segments": [...], "key": ..., "meta": ...}; a segment is a string,
    {"text": str} or {"image": path} (relative paths resolve against the JSONL file's folder). A
    document without a key gets `name` (default: the file's stem) and its line number.
    """
    path = Path(path)
    name = path.stem if name is None else name
    if not path.is_file():
        raise InterleafError(f"JSONL file not found: {path}")
    docs = []
    for lineno, line in enumerate(_utf8_text(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InterleafError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        key, meta = f"{name}-{lineno:08d}", None
        if isinstance(obj, dict):
            if "segments" not in obj:
                raise InterleafError(f"{where}: a document object needs a 'segments' list")
            key, meta, obj = str(obj.get("key", key)), obj.get("meta"), obj["segments"]
        docs.append((key, _jsonl_segments(obj, path.parent, where), meta))
    if not docs:
        raise InterleafError(f"{path} holds no documents")
    return docs


def _jsonl_segments(obj, base: Path, where: str) -> list:
    if not isinstance(obj, list) or not obj:
        raise InterleafError(f"{where}: a document must be a non-empty list of segments")
    out = []
    for i, seg in enumerate(obj):
        if isinstance(seg, str):
            out.append(seg)
        elif isinstance(seg, dict) and isinstance(seg.get("text"), str):
            out.append(seg["text"])
        elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
            p = Path(seg["image"])
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise InterleafError(f"{where}: segment {i}: image not found: {p}")
            out.append(p)
        else:
            raise InterleafError(f"{where}: segment {i} must be a string, {{'text': ...}} or {{'image': path}}")
    return out


def text_documents(paths: Sequence[str | Path], per_line: bool = False) -> list[tuple[str, list, None]]:
    """Plain text files -> one document per file (or per non-empty line)."""
    files = []
    for p in paths:
        matched = sorted(glob.glob(str(p))) if glob.has_magic(str(p)) else [str(p)]
        if not matched:
            raise InterleafError(f"no text files match {str(p)!r}")
        files.extend(Path(m) for m in matched)
    docs = []
    names = file_keys(files)
    for f in files:
        if not f.is_file():
            raise InterleafError(f"text file not found: {f}")
        text = _utf8_text(f)
        if per_line:
            docs.extend(
                (f"{names[f]}-{i:08d}", [line], None) for i, line in enumerate(text.splitlines()) if line.strip()
            )
        elif text.strip():
            docs.append((names[f], [text], None))
    if not docs:
        raise InterleafError("the text files hold no text")
    return docs


def file_keys(files: Sequence[Path]) -> dict[Path, str]:
    """Document keys (or key prefixes) of input files: their stems, or (when two share one, as
    books/*/ch1.txt or a/train.jsonl and b/train.jsonl do) their paths below the common folder,
    suffix included."""
    stems = [sanitize_key(f.stem) for f in files]
    if len(set(stems)) == len(stems):
        return dict(zip(files, stems))
    absolute = [f.resolve() for f in files]
    root = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    return {f: sanitize_key(str(a.relative_to(root))) for f, a in zip(files, absolute)}


def check_unique_keys(docs: Sequence[tuple[str, Any, Any]]) -> None:
    """Raise, before any shard is written, when two documents would get the same key."""
    seen: dict[str, str] = {}
    for key, _, _ in docs:
        k = sanitize_key(key)
        if k in seen:
            raise InterleafError(f"duplicate document key {k!r} (from {seen[k]!r} and {key!r})")
        seen[k] = key


def shapes_documents(
    count: int, kind: str = "mix", resolution: int = 64, seed: int = 0, max_shapes: int = 3, start: int = 0
) -> Iterator[tuple[str, list, Any]]:
    """Documents from the built-in shapes world: 'pairs', 'documents', 'text' or 'mix' (round robin)."""
    kinds = {"pairs", "documents", "text", "mix"}
    if kind not in kinds:
        raise InterleafError(f"unknown shapes kind {kind!r} (choose from {', '.join(sorted(kinds))})")
    if count <= 0:
        raise InterleafError("shapes: --count must be positive")
    world = ShapesWorld(resolution=resolution, max_shapes=max_shapes, seed=seed)  # checks its arguments now
    return _shapes(world, count, kind, start)


def _shapes(world, count: int, kind: str, start: int) -> Iterator[tuple[str, list, Any]]:
    order = ("pairs", "documents", "text")
    for i in range(start, start + count):
        k = order[i % 3] if kind == "mix" else kind
        if k == "pairs":
            image, text, scene = world.pair(i)
            yield f"pair-{i:09d}", [text, image], {"kind": "pair", "scenes": [scene.to_dict()]}
        elif k == "documents":
            segments, scenes = world.document(i)
            yield f"doc-{i:09d}", segments, {"kind": "document", "scenes": [s.to_dict() for s in scenes]}
        else:
            yield f"text-{i:09d}", [world.text(i)], {"kind": "text"}
