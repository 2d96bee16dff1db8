"""Streaming, packing, exactly resumable training data loader.

Order of the data, independent of the number of processes
---------------------------------------------------------
A step consumes `global_batch` rows in `n_streams = global_batch / micro_batch` micro-batches.
Each micro-batch slot of a step is fed by its own *stream*, and a stream's content depends only
on (seed, stream index, sources): stream j reads its share of every source, shuffles it with a
buffer, mixes sources by the stage weights of the current step, flips image-caption pairs and
packs documents into rows. Rank r of W owns streams r, r + W, r + 2W, ... (its gradient
accumulation micro-steps), and inside a rank, DataLoader worker w owns every num_workers-th of
those. So the same step sees the same rows on 1 process or on 8, and a checkpoint written by any
number of processes resumes on any other that divides `n_streams`: the loader state is the list
of stream states, and each process simply takes its streams.

Why not `webdataset.WebDataset`? Its pipeline (node/worker split, shard shuffle, shuffle buffer,
resampling) keeps its position in iterators and RNGs no one can save, and its split depends on
the world size. Here the reading is a plain sequential pass over each tar shard (`shards.py`'s
own checksummed tar reader, over `webdataset.gopen` for URLs, so `pipe:`/http sources work too)
and the split, shuffle and resampling are small seeded functions of counters that are saved with
every checkpoint.

How each stream reads a source
------------------------------
The source's shards are cut into *units* (shard, residue): with fewer shards than streams, each
shard is read by R = ceil(n_streams / n_shards) streams, each keeping the samples whose index is
its residue mod R; otherwise R = 1 and a unit is a whole shard. Without resampling, epoch e deals
a seeded permutation of the units round-robin to the streams (every sample once per epoch over all
streams); with resampling (infinite, webdataset's `ResampledShards`) stream j draws unit c from
a counter-based RNG (seed, source, j, c). The position of a reader is (epoch, unit cursor, sample
index inside the unit's shard) plus the shuffle buffer, saved as the (shard, sample) positions of
the documents it holds and re-read on resume (a few shards), plus the RNG state.

Packing
-------
A document of L ids gives L-1 (input, target) pairs. Rows of `seq_len` pairs are filled greedily
with whole documents: one that fits in a row but not in what is left of the current one starts the
next row (the rest of this row is padding, target -100), because a piece cut from its start would
be trained without its context (an image without its caption). Only documents longer than a row
are cut: they continue in the next row (that row's first input is the target of the previous
row's last pair). `data.split_documents: true` cuts every document that does not fit (no padding,
for long-text corpora). Either way every token of every document except its <bos> is a target
exactly once per pass. `doc_ids` number the document pieces of a row (0, 1, ...; padding at the
end of a finite stream gets its own id and target -100): attention is block-diagonal causal over
them and positions restart at each piece.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.utils.data as tud

from interleaf.errors import ConfigError, InterleafError
from interleaf.training.mixtures import Schedule, SourceConfig, StageConfig, pick, validate_mixture
from interleaf.training.shards import INDEX_FILE, ReadStats, expand_paths, iter_tar_samples, key_of, parse_document
from interleaf.training.tokenize import IMAGE, TEXT, TokenDoc, encode_document, load_tokenizer_dir, parse_token_doc
from interleaf.utils import get_logger

log = get_logger(__name__)

IGNORE = -100


@dataclass
class DataConfig:
    """Training data: sources, mixture stages, packing and loss weights."""

    sources: list[SourceConfig] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    eval_sources: list[SourceConfig] = field(default_factory=list)
    eval_batches: int = 4  # micro-batches per stream for each held-out evaluation
    seq_len: int = 512
    shuffle_buffer: int = 1000  # documents per (stream, source)
    resample: bool = True  # True: shards drawn with replacement (infinite); False: epochs over the shards
    image_first_prob: float = 0.5  # image-caption pairs shown image->caption (else caption->image)
    # plain: a pair's two segments one after the other; chameleon_prompt: as a turn and its answer, the
    # first segment then the end-of-turn token (<eot>, Chameleon's <reserved08706>), as transformers'
    # Chameleon processor writes a prompt and Anole's scripts ask for an image
    format: Literal["plain", "chameleon_prompt"] = "plain"
    split_documents: bool = False  # False: a document that fits in a row is never cut (rows padded instead)
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    num_workers: int = 0  # DataLoader worker processes per rank (0: load in the training process)
    seed: int = 0

    def validate(self) -> None:
        validate_mixture(self.sources, self.stages, "data")
        if self.eval_sources:
            validate_mixture(self.eval_sources, [], "data.eval")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1 (1 = no shuffling)")
        if not 0.0 <= self.image_first_prob <= 1.0:
            raise ConfigError("data.image_first_prob must be in [0, 1]")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ConfigError("data.text_loss_weight and data.image_loss_weight must be >= 0")
        if self.num_workers < 0 or self.eval_batches < 0:
            raise ConfigError("data.num_workers and data.eval_batches must be >= 0")


# ---- sources -------------------------------------------------------------------------------
@dataclass
class Source:
    """A source resolved to its shard list and kind ('tokens' or 'documents')."""

    name: str
    shards: list[str]
    kind: str
    weight: float = 1.0


def resolve_sources(configs: list[SourceConfig], vocab=None) -> list[Source]:
    """Expand paths (clear error on missing ones), detect kinds, check token shards' vocabulary."""
    out = []
    for c in configs:
        try:
            shards = expand_paths(c.paths)
        except InterleafError as e:
            raise InterleafError(f"data source {c.name!r}: {e}") from None
        kind = c.kind if c.kind != "auto" else detect_kind(shards)
        if kind == "tokens" and vocab is not None:
            check_vocab(shards, vocab, c.name)
        out.append(Source(c.name, shards, kind, c.weight))
    return out


def detect_kind(shards: list[str]) -> str:
    """'tokens' or 'documents', from the members of the first readable sample."""
    for path in shards[:8]:
        for _, members in iter_tar_samples(path, ReadStats()):
            if "ids.npy" in members:
                return "tokens"
            if "json" in members:
                return "documents"
            raise InterleafError(f"{path}: samples are neither documents (.json) nor tokens (.ids.npy)")
    raise InterleafError(f"cannot tell the kind of shards {shards[0]}...: no readable sample in the first ones")


def shard_index(shards: list[str]) -> list[dict]:
    """The index.json files of the folders holding these shards (those that have one)."""
    out = []
    for folder in sorted({str(Path(p).parent) for p in shards if "://" not in p and not p.startswith("pipe:")}):
        f = Path(folder) / INDEX_FILE
        if f.is_file():
            try:
                out.append(json.loads(f.read_text()))
            except json.JSONDecodeError:
                raise InterleafError(f"{f} is not valid JSON") from None
    return out


def check_vocab(shards: list[str], vocab, name: str) -> None:
    """Token shards whose index.json records a different vocabulary are refused."""
    for index in shard_index(shards):
        if "vocab" in index and index["vocab"] != vocab.to_dict():
            raise InterleafError(
                f"data source {name!r}: token shards were made with another vocabulary "
                f"(size {index['vocab'].get('size')} vs {vocab.size}); re-run `interleaf tokenize`"
            )


# ---- one source, one stream ----------------------------------------------------------------
class SourceReader:
    """Resumable stream of TokenDocs from one source for one loader stream (see module docstring)."""

    def __init__(
        self,
        source: Source,
        source_index: int,
        stream: int,
        n_streams: int,
        seed: int,
        resample: bool,
        buffer_size: int,
        decode,
        stats: ReadStats,
        epochs: int | None = None,
    ):
        self.source, self.stream, self.n_streams = source, stream, n_streams
        self.k, self.seed, self.resample, self.epochs = source_index, seed, resample, epochs
        self.buffer_size, self.decode, self.stats = buffer_size, decode, stats
        n = len(source.shards)
        self.R = 1 if resample else max(1, math.ceil(n_streams / n))
        self.n_units = n * self.R
        self.epoch = self.cursor = self.sample = 0
        self.exhausted = False
        self.rng = np.random.default_rng([seed, source_index, stream, 1])
        self.buffer: list[TokenDoc] = []  # the shuffle buffer
        self.positions = np.zeros((buffer_size, 2), dtype=np.int64)  # (shard, sample) of buffer[i]
        self._it: Iterator | None = None
        self._unit: tuple[int, int] | None = None
        self._empty_units = 0

    # -- units --
    def unit(self, epoch: int, cursor: int) -> tuple[int, int] | None:
        """(shard, residue) of this stream's `cursor`-th unit in `epoch`; None past the epoch's end."""
        if self.resample:
            u = int(np.random.default_rng([self.seed, self.k, self.stream, cursor, 2]).integers(self.n_units))
        else:
            perm = np.random.default_rng([self.seed, self.k, epoch, 3]).permutation(self.n_units)
            mine = perm[self.stream :: self.n_streams]
            if cursor >= len(mine):
                return None
            u = int(mine[cursor])
        return u // self.R, u % self.R

    def _samples(self, shard: int, start: int, stats: ReadStats | None = None) -> Iterator[tuple[int, str, dict]]:
        """(index, key, members) of a shard from sample `start` on (earlier ones read, not decoded)."""
        stats = self.stats if stats is None else stats
        for i, (key, members) in enumerate(iter_tar_samples(self.source.shards[shard], stats)):
            if i >= start:
                yield i, key, members

    def _read(self) -> tuple[int, int, TokenDoc] | None:
        """The next document of this stream's units (advancing epochs); None when exhausted."""
        while True:
            if self._it is None:
                unit = self.unit(self.epoch, self.cursor)
                if unit is None:
                    self.epoch, self.cursor, self.sample = self.epoch + 1, 0, 0
                    if self.epochs is not None and self.epoch >= self.epochs:
                        return None
                    continue
                self._unit = unit
                self._it = self._samples(unit[0], self.sample)
            item = next(self._it, None)
            if item is None:
                self._it, self.cursor, self.sample = None, self.cursor + 1, 0
                self._empty_units += 1
                if self._empty_units > 2 * self.n_units + 8:
                    raise InterleafError(
                        f"data source {self.source.name!r}: no readable document for loader "
                        f"stream {self.stream} (corrupt shards, or fewer documents than streams?)"
                    )
                continue
            i, key, members = item
            self.sample = i + 1
            shard, residue = self._unit
            if i % self.R != residue:
                continue
            doc = self._decode(shard, key, members)
            if doc is not None:
                self._empty_units = 0
                return shard, i, doc

    def _decode(self, shard: int, key: str, members: dict) -> TokenDoc | None:
        self.stats.samples += 1
        try:
            doc = self.decode(self.source.kind, key_of(key), members)
        except InterleafError as e:
            kind = "bad_images" if "cannot read image" in str(e) else "bad_samples"
            self.stats.warn(kind, f"{self.source.shards[shard]}: {e}")
            return None
        if len(doc.ids) < 2:
            return None
        return doc

    def next(self) -> TokenDoc | None:
        """Next document after the shuffle buffer; None when the source is exhausted."""
        while not self.exhausted and len(self.buffer) < self.buffer_size:
            item = self._read()
            if item is None:
                self.exhausted = True
                break
            self.positions[len(self.buffer)] = item[:2]
            self.buffer.append(item[2])
        if not self.buffer:
            return None
        i, last = int(self.rng.integers(len(self.buffer))), len(self.buffer) - 1
        doc = self.buffer[i]
        self.buffer[i] = self.buffer[last]  # swap-remove, positions alike
        self.positions[i] = self.positions[last]
        self.buffer.pop()
        return doc

    # -- state --
    def state_dict(self) -> dict:
        """Position as plain values; `buffer` is an int64 (n, 2) array of (shard, sample) (cheap to send)."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "sample": self.sample,
            "exhausted": self.exhausted,
            "rng": self.rng.bit_generator.state,
            "buffer": self.positions[: len(self.buffer)].copy(),
        }

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.cursor, self.sample = int(st["epoch"]), int(st["cursor"]), int(st["sample"])
        self.exhausted = bool(st["exhausted"])
        self.rng.bit_generator.state = st["rng"]
        self._it = None
        items = self._reread([(int(s), int(i)) for s, i in np.asarray(st["buffer"]).reshape(-1, 2)])
        self.buffer = [doc for _, _, doc in items]
        for k, (s, i, _) in enumerate(items):
            self.positions[k] = (s, i)

    def _reread(self, positions: list[tuple[int, int]]) -> list:
        """Documents at (shard, sample) positions, in the given order (one pass per shard)."""
        found: dict[tuple[int, int], TokenDoc] = {}
        stats = ReadStats()  # re-reading must not count problems twice
        for shard in sorted({s for s, _ in positions}):
            wanted = {i for s, i in positions if s == shard}
            for i, key, members in self._samples(shard, 0, stats):
                if i in wanted:
                    try:
                        found[(shard, i)] = self.decode(self.source.kind, key_of(key), members)
                    except InterleafError:
                        pass
                if i >= max(wanted):
                    break
        lost = [p for p in positions if p not in found]
        if lost:
            stats.warn(
                "bad_samples",
                f"data source {self.source.name!r}: {len(lost)} buffered documents could not be re-read on resume",
            )
        return [(s, i, found[(s, i)]) for s, i in positions if (s, i) in found]


# ---- decoding samples ----------------------------------------------------------------------
class Decoder:
    """Sample members -> TokenDoc; document shards are tokenized on the fly (tokenizer loaded lazily)."""

    def __init__(self, vocab_size: int, tokenizer_dir: str | None):
        self.vocab_size, self.tokenizer_dir = vocab_size, tokenizer_dir
        self._tok = None

    def __call__(self, kind: str, key: str, members: dict) -> TokenDoc:
        if kind == "tokens":
            return parse_token_doc(key, members, self.vocab_size)
        if self._tok is None:
            if self.tokenizer_dir is None:
                raise ConfigError("document shards are tokenized on the fly, which needs `tokenizer:` in the config")
            self._tok = load_tokenizer_dir(self.tokenizer_dir).multimodal()
        with torch.inference_mode():
            return encode_document(parse_document(key, members), self._tok)

    def __getstate__(self):
        return {"vocab_size": self.vocab_size, "tokenizer_dir": self.tokenizer_dir, "_tok": None}


# ---- one stream: mixture + pairs + packing -------------------------------------------------
@dataclass
class StreamSpec:
    """Everything a stream needs; picklable (sent to DataLoader workers)."""

    sources: list[Source]
    stages: list[StageConfig]
    total_steps: int
    n_streams: int
    micro_batch: int
    seq_len: int
    seed: int
    resample: bool
    shuffle_buffer: int
    image_first_prob: float
    split_documents: bool
    text_loss_weight: float
    image_loss_weight: float
    image_table: np.ndarray  # bool (vocab size,): True on image-code ids
    pad_id: int
    decoder: Decoder
    epochs: int | None = None  # None: infinite; 1: one pass (evaluation, tests)
    eot_id: int | None = None  # placed between a pair's segments (data.format chameleon_prompt)


class PackedStream:
    """Loader stream j: documents from the mixture, packed into (micro_batch, seq_len) batches."""

    def __init__(self, spec: StreamSpec, index: int):
        self.spec, self.index = spec, index
        self.stats = ReadStats()
        self.readers = [
            SourceReader(
                src,
                k,
                index,
                spec.n_streams,
                spec.seed,
                spec.resample,
                spec.shuffle_buffer,
                spec.decoder,
                self.stats,
                spec.epochs,
            )
            for k, src in enumerate(spec.sources)
        ]
        self.schedule = Schedule(
            [s.name for s in spec.sources], [s.weight for s in spec.sources], spec.stages, spec.total_steps
        )
        self.rng = np.random.default_rng([spec.seed, index, 4])
        self.step = 0  # micro-batches produced = training steps seen by this stream
        self.carry: tuple[np.ndarray, int] | None = None  # document being packed, next input offset
        self.done = False

    def _next_doc(self) -> np.ndarray | None:
        alive = [not r.exhausted or bool(r.buffer) for r in self.readers]
        weights = self.schedule.weights(self.step)
        while True:
            k = pick(weights, alive, float(self.rng.random()))
            if k is None:
                return None
            doc = self.readers[k].next()
            if doc is None:
                alive[k] = False
                continue
            return self._order(doc)

    def _order(self, doc: TokenDoc) -> np.ndarray:
        """Image-caption pairs (one text + one image segment) in the order drawn for them, the first
        one ending a turn when the spec has an end-of-turn id."""
        segs = doc.segs
        if len(segs) != 2 or {int(segs[0, 0]), int(segs[1, 0])} != {TEXT, IMAGE}:
            return doc.ids
        image_first = bool(self.rng.random() < self.spec.image_first_prob)
        (_, a0, a1), (_, b0, b1) = segs.tolist()
        ids = doc.ids
        keep = (int(segs[0, 0]) == IMAGE) == image_first
        if keep and self.spec.eot_id is None:
            return ids
        first, second = (ids[a0:a1], ids[b0:b1]) if keep else (ids[b0:b1], ids[a0:a1])
        eot = np.asarray([] if self.spec.eot_id is None else [self.spec.eot_id], dtype=ids.dtype)
        return np.concatenate([ids[:a0], first, ids[a1:b0], eot, second, ids[b1:]])

    def _row(self) -> tuple[dict, int]:
        """One packed row; returns (arrays, number of real pairs)."""
        T = self.spec.seq_len
        tokens = np.full(T, self.spec.pad_id, dtype=np.int64)
        targets = np.full(T, IGNORE, dtype=np.int64)
        doc_ids = np.zeros(T, dtype=np.int64)
        lens: list[int] = []
        pos = 0
        while pos < T:
            if self.carry is None:
                ids = self._next_doc()
                if ids is None:
                    break
                self.carry = (ids, 0)
            ids, off = self.carry
            left = len(ids) - 1 - off  # (input, target) pairs still to place
            if off == 0 and pos > 0 and T - pos < left <= T and not self.spec.split_documents:
                break  # it fits in a row of its own: start the next row with it, whole
            n = min(left, T - pos)
            tokens[pos : pos + n] = ids[off : off + n]
            targets[pos : pos + n] = ids[off + 1 : off + n + 1]
            doc_ids[pos : pos + n] = len(lens)
            lens.append(n)
            pos += n
            self.carry = None if off + n >= len(ids) - 1 else (ids, off + n)
        real = pos
        if pos < T:
            doc_ids[pos:] = len(lens)
            lens.append(T - pos)
        return {"tokens": tokens, "targets": targets, "doc_ids": doc_ids, "doc_lens": lens}, real

    def pad_batch(self) -> dict:
        """A micro-batch with no targets (a finished finite stream keeps its slot with these)."""
        return pad_batch(self.spec)

    def next_batch(self) -> dict | None:
        """The next micro-batch (numpy arrays), or None once a finite stream has nothing left."""
        if self.done:
            return None
        rows, real = [], 0
        for _ in range(self.spec.micro_batch):
            row, n = self._row()
            rows.append(row)
            real += n
        if real == 0:
            self.done = True
            return None
        self.step += 1
        return self._collate(rows)

    def _collate(self, rows: list[dict]) -> dict:
        return collate(self.spec, rows)

    # -- state --
    def state_dict(self) -> dict:
        """Exact position (numpy arrays inside: `jsonable` before writing it as JSON)."""
        carry = None if self.carry is None else [self.carry[0].copy(), self.carry[1]]
        return {
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "carry": carry,
            "done": self.done,
            "stats": self.stats.to_dict(),
            "readers": {r.source.name: r.state_dict() for r in self.readers},
        }

    def load_state_dict(self, st: dict) -> None:
        self.step, self.done = int(st["step"]), bool(st.get("done", False))
        self.rng.bit_generator.state = st["rng"]
        self.carry = None if st["carry"] is None else (np.asarray(st["carry"][0], dtype=np.int32), int(st["carry"][1]))
        self.stats.load(st.get("stats", {}))
        for r in self.readers:
            if r.source.name not in st["readers"]:
                raise InterleafError(
                    f"loader state has no position for data source {r.source.name!r} "
                    f"(sources cannot be added to a run being resumed)"
                )
            r.load_state_dict(st["readers"][r.source.name])


def collate(spec: StreamSpec, rows: list[dict]) -> dict:
    """Rows -> a micro-batch: (B, T) tokens, targets, doc_ids, loss weights and image-target mask."""
    targets = np.stack([r["targets"] for r in rows])  # (B, T)
    valid = targets != IGNORE
    is_image = valid & spec.image_table[np.where(valid, targets, 0)]
    weights = np.where(is_image, spec.image_loss_weight, spec.text_loss_weight)
    return {
        "tokens": np.stack([r["tokens"] for r in rows]),
        "targets": targets,
        "doc_ids": np.stack([r["doc_ids"] for r in rows]),
        "weights": np.where(valid, weights, 0.0).astype(np.float32),
        "is_image": is_image,
        "doc_lens": [r["doc_lens"] for r in rows],
    }


def pad_batch(spec: StreamSpec) -> dict:
    """A micro-batch without targets (fills the slot of a finished finite stream)."""
    T = spec.seq_len
    row = {
        "tokens": np.full(T, spec.pad_id, dtype=np.int64),
        "targets": np.full(T, IGNORE, dtype=np.int64),
        "doc_ids": np.zeros(T, dtype=np.int64),
        "doc_lens": [T],
    }
    return collate(spec, [row] * spec.micro_batch)


# ---- per-rank loader -----------------------------------------------------------------------
def rank_streams(n_streams: int, rank: int, world: int) -> list[int]:
    """Streams owned by `rank`, in micro-step order."""
    return list(range(rank, n_streams, world))


class _WorkerStreams(tud.IterableDataset):
    """DataLoader dataset: each worker runs every num_workers-th stream of the rank."""

    def __init__(self, spec: StreamSpec, streams: list[int], states: dict):
        self.spec, self.streams, self.states = spec, streams, states

    def __iter__(self):
        info = tud.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [PackedStream(self.spec, j) for a, j in enumerate(self.streams) if a % nw == wid]
        for s in mine:
            if str(s.index) in self.states:
                s.load_state_dict(self.states[str(s.index)])
        while True:
            for s in mine:
                batch = s.next_batch()
                if batch is None:  # training streams are infinite; finite ones run in-process
                    raise RuntimeError(f"loader stream {s.index} ended")
                yield s.index, batch, s.state_dict()


def _as_is(item):
    """DataLoader collate_fn: keep numpy arrays (pickled by value: cheaper than shared-memory tensors)."""
    return item


class StreamingLoader:
    """Micro-batches for one rank, in training order; `state_dict()` is its exact position."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world: int = 1, num_workers: int = 0):
        if spec.n_streams % world:
            raise ConfigError(
                f"the loader's {spec.n_streams} streams (global_batch / micro_batch) cannot be "
                f"split over {world} processes"
            )
        self.spec, self.rank, self.world = spec, rank, world
        self.streams = rank_streams(spec.n_streams, rank, world)
        n = len(self.streams)
        self.num_workers = max((d for d in range(1, min(num_workers, n) + 1) if n % d == 0), default=0)
        if num_workers and self.num_workers != num_workers:
            log.info("using %d loader workers (it must divide the %d micro-steps per step)", self.num_workers, n)
        self.states: dict[str, dict] = {}
        self._local: list[PackedStream] | None = None

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's streams from a full loader state (written by any world size)."""
        if int(state["n_streams"]) != self.spec.n_streams:
            raise InterleafError(
                f"cannot resume: the checkpoint's data order has {state['n_streams']} streams, this run "
                f"{self.spec.n_streams} (keep global_batch / micro_batch unchanged when resuming)"
            )
        self.states = {str(j): state["streams"][str(j)] for j in self.streams if str(j) in state["streams"]}

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches in micro-step order; a finite stream ends when all of the rank's streams have
        ended (the ones that ended first fill their slots with target-free batches until then)."""
        if self.num_workers and self.spec.epochs is None:
            yield from self._iter_workers()
            return
        self._local = [PackedStream(self.spec, j) for j in self.streams]
        for s in self._local:
            if str(s.index) in self.states:
                s.load_state_dict(self.states[str(s.index)])
        while True:
            batches = [s.next_batch() for s in self._local]
            if all(b is None for b in batches):
                return
            for s, b in zip(self._local, batches):
                yield b if b is not None else s.pad_batch()

    def _iter_workers(self) -> Iterator[dict]:
        body = _WorkerStreams(self.spec, self.streams, dict(self.states))
        dl = tud.DataLoader(
            body,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,
            multiprocessing_context="spawn",
            persistent_workers=False,
        )
        order = 0
        for j, batch, st in dl:
            expected = self.streams[order % len(self.streams)]
            if j != expected:
                raise RuntimeError(f"loader workers out of order: stream {j}, expected {expected}")
            order += 1
            self.states[str(j)] = st
            yield batch

    def state_dict(self) -> dict:
        """{stream index: state} of this rank's streams after the last micro-batch handed out."""
        if self._local is not None:
            return {str(s.index): s.state_dict() for s in self._local}
        return dict(self.states)

    def read_stats(self) -> dict:
        """Skipped shards/samples/images so far, summed over this rank's streams."""
        total = ReadStats()
        for st in self.state_dict().values():
            for k, v in st.get("stats", {}).items():
                setattr(total, k, getattr(total, k) + v)
        return total.to_dict()


def full_state(states: list[dict], n_streams: int) -> dict:
    """Merge the per-rank state dicts into the world-size-independent loader state (JSON-ready)."""
    merged: dict[str, dict] = {}
    for st in states:
        merged.update(st)
    return {"version": 1, "n_streams": n_streams, "streams": jsonable(merged)}


def jsonable(x):
    """numpy arrays and scalars inside dicts/lists -> lists and Python numbers."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---- helpers -------------------------------------------------------------------------------
def to_torch(batch: dict, device="cpu") -> dict:
    """numpy micro-batch -> torch tensors on `device` (doc_lens stays a list)."""
    out = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items() if k != "doc_lens"}
    out["doc_lens"] = batch["doc_lens"]
    return out


def attention_mask(doc_ids: np.ndarray) -> np.ndarray:
    """Bool (B, T, T): query i may attend key j iff j <= i and both are in the same document piece."""
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = np.tril(np.ones((doc_ids.shape[1],) * 2, dtype=bool))
    return same & causal[None]


def positions(doc_ids: np.ndarray) -> np.ndarray:
    """Position of each token inside its document piece (B, T), restarting at 0."""
    T = doc_ids.shape[1]
    idx = np.broadcast_to(np.arange(T), doc_ids.shape)
    start = np.concatenate([np.ones_like(doc_ids[:, :1], dtype=bool), doc_ids[:, 1:] != doc_ids[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
    return idx - first


def batch_crc(batch: dict) -> int:
    """crc32 of a micro-batch's tokens and targets: a fingerprint of the data a step saw."""
    tokens = np.ascontiguousarray(np.asarray(batch["tokens"], dtype=np.int64))
    targets = np.ascontiguousarray(np.asarray(batch["targets"], dtype=np.int64))
    return zlib.crc32(targets.tobytes(), zlib.crc32(tokens.tobytes()))


def make_spec(
    data: DataConfig,
    sources: list[Source],
    vocab,
    tokenizer_dir: str | None,
    total_steps: int,
    n_streams: int,
    micro_batch: int,
    seq_len: int | None = None,
    eval_mode: bool = False,
) -> StreamSpec:
    """StreamSpec for training (infinite, shuffled, mixed by stage) or evaluation (one ordered pass)."""
    return StreamSpec(
        sources=sources,
        stages=[] if eval_mode else list(data.stages),
        total_steps=total_steps,
        n_streams=n_streams,
        micro_batch=micro_batch,
        seq_len=seq_len or data.seq_len,
        seed=data.seed,
        resample=False if eval_mode else data.resample,
        shuffle_buffer=1 if eval_mode else data.shuffle_buffer,
        image_first_prob=data.image_first_prob,
        split_documents=data.split_documents,
        text_loss_weight=data.text_loss_weight,
        image_loss_weight=data.image_loss_weight,
        image_table=vocab.image_mask().numpy(),
        pad_id=vocab.pad_id,
        decoder=Decoder(vocab.size, tokenizer_dir),
        epochs=1 if eval_mode else None,
        eot_id=vocab.eot_id if data.format == "chameleon_prompt" else None,
    )
