"""The packing, mixing, exactly resumable loader (interleaf/training/loader.py), in-process."""

import dataclasses
import json

import numpy as np
import pytest
from training_helpers import make_tokenizer_dir, truncate, write_token_shards

from interleaf.errors import InterleafError
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.training.loader import (
    IGNORE,
    DataConfig,
    StreamingLoader,
    attention_mask,
    full_state,
    jsonable,
    make_spec,
    positions,
    resolve_sources,
)
from interleaf.training.mixtures import Schedule, SourceConfig, StageConfig, pick

VOCAB = Vocabulary.build(n_text=16 + 400, n_codes=32, image_grid=(2, 2))


def spec(tmp_sources, n_streams=4, micro=2, seq_len=24, total_steps=100, **overrides):
    data = DataConfig(
        sources=tmp_sources,
        seq_len=seq_len,
        shuffle_buffer=overrides.pop("buffer", 5),
        stages=overrides.pop("stages", []),
        resample=overrides.pop("resample", True),
        image_first_prob=overrides.pop("image_first_prob", 0.5),
        text_loss_weight=overrides.pop("text_w", 1.0),
        image_loss_weight=overrides.pop("image_w", 1.0),
    )
    data.validate()
    tok = overrides.pop("tokenizer", None)
    s = make_spec(data, resolve_sources(data.sources, VOCAB), VOCAB, tok, total_steps, n_streams, micro)
    return dataclasses.replace(s, **overrides)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    docs = write_token_shards(d, VOCAB, n_docs=45, per_shard=7)
    return d, docs


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("tokens", "targets", "doc_ids", "weights", "is_image"):
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


# ---- packing -------------------------------------------------------------------------------
def assemble(batches):
    """Rebuild whole documents from packed rows (pieces of one document chain: overlap by one token)."""
    docs, current, last_target = [], None, None
    for b in batches:
        for tokens, targets, doc_ids in zip(b["tokens"], b["targets"], b["doc_ids"]):
            for d in np.unique(doc_ids):
                sel = doc_ids == d
                idx = np.flatnonzero(sel)
                assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a document piece must be contiguous"
                tok, tgt = tokens[sel], targets[sel]
                if (tgt == IGNORE).all():
                    continue  # padding at the end of a finite stream
                assert (tgt != IGNORE).all()
                assert np.array_equal(tok[1:], tgt[:-1]), "inputs and targets of a piece are one chain"
                if tok[0] == VOCAB.bos_id:
                    assert current is None, "a document started before the previous one ended"
                    current = [int(tok[0])]
                else:
                    assert current is not None and tok[0] == last_target, "continuation must resume where it stopped"
                current.extend(int(t) for t in tgt)
                last_target = tgt[-1]
                if tgt[-1] == VOCAB.eos_id:
                    docs.append(tuple(current))
                    current = None
    assert current is None
    return docs


@pytest.mark.parametrize("split", [False, True])
def test_packing_trains_every_token_once_and_never_across_documents(shards, split):
    d, docs = shards
    T = 24
    s = spec(
        [SourceConfig("a", [str(d)])],
        n_streams=4,
        micro=2,
        seq_len=T,
        image_first_prob=0.0,
        resample=False,
        epochs=1,
        split_documents=split,
    )
    batches = list(StreamingLoader(s, 0, 1))
    # a document that fits in a row is cut only when asked to (a cut piece loses its context)
    n_short = sum(len(doc.ids) - 1 <= T for doc in docs.values())
    assert 0 < n_short < len(docs), "the fixture needs documents shorter and longer than a row"
    pieces = [
        (tok[row_ids == i], tgt[row_ids == i])
        for b in batches
        for tok, tgt, row_ids in zip(b["tokens"], b["targets"], b["doc_ids"])
        for i in np.unique(row_ids)
    ]
    n_whole = sum(tok[0] == VOCAB.bos_id and tgt[-1] == VOCAB.eos_id for tok, tgt in pieces)
    assert (n_whole < n_short) if split else (n_whole == n_short)
    # every document exactly once (every token except <bos> a target exactly once), nothing else
    got = sorted(doc for i in range(4) for doc in assemble(batches[i::4]))  # per stream, pieces chain in order
    assert got == sorted(tuple(doc.ids.tolist()) for doc in docs.values())
    n_targets = sum(int((np.asarray(b["targets"]) != IGNORE).sum()) for b in batches)
    assert n_targets == sum(len(doc.ids) - 1 for doc in docs.values())
    # the mask the loader's doc_ids imply: causal within a piece, nothing across pieces
    for b in batches:
        mask = attention_mask(b["doc_ids"])
        same = b["doc_ids"][:, :, None] == b["doc_ids"][:, None, :]
        assert not (mask & ~same).any()
        T = b["doc_ids"].shape[1]
        assert not (mask & ~np.tril(np.ones((T, T), bool))).any()
        pos = positions(b["doc_ids"])
        starts = np.concatenate([np.ones((len(pos), 1), bool), b["doc_ids"][:, 1:] != b["doc_ids"][:, :-1]], 1)
        assert (pos[starts] == 0).all() and (np.diff(pos, axis=1)[~starts[:, 1:]] == 1).all()
        lens = [np.bincount(row).tolist() for row in b["doc_ids"]]
        assert lens == b["doc_lens"]


def test_pairs_in_both_orders(shards):
    d, docs = shards
    pairs = {tuple(doc.ids.tolist()) for doc in docs.values() if len(doc.segs) == 2}
    flipped = set()
    for doc in docs.values():
        if len(doc.segs) == 2:
            (_, a0, a1), (_, b0, b1) = doc.segs.tolist()
            i = doc.ids
            flipped.add(tuple(np.concatenate([i[:a0], i[b0:b1], i[a1:b0], i[a0:a1], i[b1:]]).tolist()))
    counts = {}
    for p in (0.0, 1.0, 0.5):
        s = spec([SourceConfig("a", [str(d)])], n_streams=2, image_first_prob=p, resample=False, epochs=1)
        seen = [doc for i in range(2) for doc in assemble(list(StreamingLoader(s, 0, 1))[i::2])]
        as_stored, as_flipped = sum(x in pairs for x in seen), sum(x in flipped for x in seen)
        assert as_stored + as_flipped == len(pairs)
        counts[p] = as_flipped
    assert counts[0.0] == 0 and counts[1.0] == len(pairs)  # stored caption first: p is image-first
    assert 0 < counts[0.5] < len(pairs)


def test_pairs_as_a_turn_and_its_answer(shards):
    """data.format chameleon_prompt: <bos> first <eot> second <eos> for pairs, in the order plain draws
    (the same documents with <eot> taken out); other documents unchanged."""
    d, docs = shards
    eot = VOCAB.eot_id
    seen = {}
    for fmt in ("plain", "chameleon_prompt"):
        s = spec([SourceConfig("a", [str(d)])], n_streams=2, resample=False, epochs=1)
        s = dataclasses.replace(s, eot_id=eot if fmt == "chameleon_prompt" else None)
        seen[fmt] = [doc for i in range(2) for doc in assemble(list(StreamingLoader(s, 0, 1))[i::2])]
    plain, prompt = seen["plain"], seen["chameleon_prompt"]
    assert len(plain) == len(prompt) == len(docs)
    n_pairs = sum(len(doc.segs) == 2 for doc in docs.values())
    turns = 0
    for a, b in zip(plain, prompt):
        if eot in b:
            turns += 1
            k = b.index(eot)
            assert b.count(eot) == 1 and a == b[:k] + b[k + 1 :]
            first, second = b[1:k], b[k + 1 : -1]
            assert (first[0] == VOCAB.boi_id) != (second[0] == VOCAB.boi_id)  # one image, one caption
            assert (first[0] == VOCAB.boi_id) == (first[-1] == VOCAB.eoi_id)
        else:
            assert a == b
    assert turns == n_pairs > 0
    assert make_spec(DataConfig(format="chameleon_prompt"), [], VOCAB, None, 1, 1, 1).eot_id == eot
    assert make_spec(DataConfig(), [], VOCAB, None, 1, 1, 1).eot_id is None


def test_loss_weights_and_image_targets(shards):
    d, _ = shards
    s = spec([SourceConfig("a", [str(d)])], text_w=0.5, image_w=2.0)
    b = take(StreamingLoader(s, 0, 1), 1)[0]
    targets = b["targets"]
    image = np.isin(targets, VOCAB.image_ids)
    assert (b["is_image"] == image).all() and image.any()
    assert (b["weights"][image] == 2.0).all() and (b["weights"][~image & (targets != IGNORE)] == 0.5).all()


# ---- order, resume, re-split ---------------------------------------------------------------
def test_world_size_does_not_change_the_data(shards):
    d, _ = shards
    s = spec([SourceConfig("a", [str(d)])], n_streams=4)
    one = take(StreamingLoader(s, 0, 1), 12)  # 3 steps x 4 micro-batches
    r0, r1 = take(StreamingLoader(s, 0, 2), 6), take(StreamingLoader(s, 1, 2), 6)
    two = [
        x for step in range(3) for pair in zip(r0[2 * step : 2 * step + 2], r1[2 * step : 2 * step + 2]) for x in pair
    ]
    same_batches(one, two)
    with pytest.raises(Exception, match="cannot be split over 3"):
        StreamingLoader(s, 0, 3)


def mixture_spec(shards_dir, other_dir, **kw):
    sources = [SourceConfig("a", [str(shards_dir)], weight=0.7), SourceConfig("b", [str(other_dir)], weight=0.3)]
    return spec(sources, n_streams=4, micro=2, stages=[StageConfig(0.5, {"a": 0.2, "b": 0.8})], total_steps=8, **kw)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    d = tmp_path_factory.mktemp("other")
    write_token_shards(d, VOCAB, n_docs=20, per_shard=3, seed=1, prefix="o")
    return d


def test_resume_is_exact_and_resplits_over_world_sizes(shards, other):
    d, _ = shards
    s = mixture_spec(d, other, buffer=6)
    loaders = [StreamingLoader(s, r, 2) for r in range(2)]
    its = [iter(loader) for loader in loaders]
    for _ in range(3):  # 3 steps, 2 micro-batches per rank
        for it in its:
            next(it), next(it)
    state = json.loads(json.dumps(full_state([loader.state_dict() for loader in loaders], 4)))  # as written to disk
    ref = {r: [next(its[r]) for _ in range(6)] for r in range(2)}  # steps 4-6
    for r in range(2):  # same world size
        again = StreamingLoader(s, r, 2)
        again.load_state_dict(state)
        same_batches(take(again, 6), ref[r])
    single = StreamingLoader(s, 0, 1)  # re-split onto one process: micro-steps are streams 0, 1, 2, 3
    single.load_state_dict(state)
    got = take(single, 12)
    for step in range(3):
        same_batches(got[4 * step : 4 * step + 4 : 2], ref[0][2 * step : 2 * step + 2])
        same_batches(got[4 * step + 1 : 4 * step + 4 : 2], ref[1][2 * step : 2 * step + 2])
    bad = StreamingLoader(spec([SourceConfig("a", [str(d)])], n_streams=2), 0, 1)
    with pytest.raises(InterleafError, match="streams"):
        bad.load_state_dict(state)


def test_dataloader_workers_match_in_process(shards, other):
    d, _ = shards
    s = mixture_spec(d, other)
    ref = StreamingLoader(s, 0, 1)
    want = take(ref, 8)
    workers = StreamingLoader(s, 0, 1, num_workers=2)
    same_batches(take(workers, 8), want)
    assert jsonable(workers.state_dict()) == jsonable(ref.state_dict())


def test_stage_schedule_switches_the_mixture(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_token_shards(a, VOCAB, 30, 5, seed=2, kinds=("text",), prefix="a")
    write_token_shards(b, VOCAB, 30, 5, seed=3, kinds=("pair",), prefix="b")
    s = spec(
        [SourceConfig("a", [str(a)], weight=1.0), SourceConfig("b", [str(b)], weight=0.0)],
        n_streams=1,
        micro=1,
        stages=[StageConfig(0.5, {"a": 0.0, "b": 1.0})],
        total_steps=10,
    )
    batches = take(StreamingLoader(s, 0, 1), 10)
    has_image = [bool(np.asarray(x["is_image"]).any()) for x in batches]
    assert not any(has_image[:5]) and all(has_image[6:])  # step 5 may still finish a text document
    sched = Schedule(["x", "y"], [0.8, 0.2], [StageConfig(0.8, {"y": 1.0})], total_steps=100)
    assert sched.stage(79) == 0 and sched.stage(80) == 1
    rng = np.random.default_rng(0)
    picks = [pick(sched.weights(0), np.array([True, True]), rng.random()) for _ in range(4000)]
    assert abs(np.mean(np.array(picks) == 0) - 0.8) < 0.03
    assert pick(sched.weights(90), np.array([True, True]), 0.3) == 1
    assert pick(sched.weights(90), np.array([True, False]), 0.3) is None


def test_resampled_stream_is_infinite_and_epochs_are_not(shards):
    d, docs = shards
    total = sum(len(doc.ids) - 1 for doc in docs.values())
    s = spec([SourceConfig("a", [str(d)])], n_streams=1, micro=1, seq_len=32, split_documents=True)
    batches = take(StreamingLoader(s, 0, 1), total // 32 + 20)  # more than one pass
    assert all((np.asarray(b["targets"]) != IGNORE).all() for b in batches)  # no end-of-stream padding
    s = spec([SourceConfig("a", [str(d)])], n_streams=1, micro=1, seq_len=32)  # whole documents: rows padded
    batches = take(StreamingLoader(s, 0, 1), total // 16 + 20)
    n = [int((np.asarray(b["targets"]) != IGNORE).sum()) for b in batches]
    assert min(n) > 0 and sum(n) > total
    s2 = spec([SourceConfig("a", [str(d)])], n_streams=1, micro=1, seq_len=32, resample=False, epochs=2)
    n = sum(int((b["targets"] != IGNORE).sum()) for b in StreamingLoader(s2, 0, 1))
    assert n == 2 * total


# ---- bad data ------------------------------------------------------------------------------
def test_corrupt_shards_and_bad_images_are_skipped_and_counted(tmp_path):
    from interleaf.data.shapes import ShapesWorld
    from interleaf.training.shards import ShardWriter, document_members

    tok = tmp_path / "tok"
    vocab = make_tokenizer_dir(tok)
    world = ShapesWorld(resolution=32)
    d = tmp_path / "docs"
    w = ShardWriter(d, "s", max_count=4)
    good = 0
    for i in range(12):
        image, caption, _ = world.pair(i)
        members = document_members([caption, image])
        if i == 5:
            members["0.png"] = b"\x89PNG but not really"
        else:
            good += 1
        w.write(f"doc{i}", members)
    w.close()
    truncate(d / "s-000002.tar")  # the last shard: 4 documents, of which some survive
    (d / "s-000009.tar").write_bytes(b"this is not a tar file" * 40)
    data = DataConfig(sources=[SourceConfig("a", [str(d)])], seq_len=40, shuffle_buffer=3)
    srcs = resolve_sources(data.sources, vocab)
    assert srcs[0].kind == "documents"
    s = dataclasses.replace(make_spec(data, srcs, vocab, str(tok), 10, 2, 1), resample=False, epochs=1)
    loader = StreamingLoader(s, 0, 1)
    batches = list(loader)
    stats = loader.read_stats()
    assert stats["bad_images"] == 1 and stats["bad_shards"] == 2
    n_docs = sum(int((np.asarray(b["tokens"]) == vocab.bos_id).sum()) for b in batches)
    assert 8 - 1 <= n_docs < good  # shards 0-1 minus the bad image, plus what survived of shard 2
    assert n_docs == stats["samples"] - stats["bad_images"]
    with pytest.raises(InterleafError, match="no shards match"):
        resolve_sources([SourceConfig("x", [str(tmp_path / "nothing-*.tar")])])
    with pytest.raises(InterleafError, match="not found"):
        resolve_sources([SourceConfig("x", [str(tmp_path / "missing.tar")])])
