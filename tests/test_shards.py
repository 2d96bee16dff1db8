"""Shard format, writer, readers, `interleaf shards` and `interleaf tokenize`."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from training_helpers import make_tokenizer_dir, truncate

from interleaf.cli import main
from interleaf.errors import InterleafError
from interleaf.training.shards import (
    ReadStats,
    ShardWriter,
    document_members,
    expand_paths,
    iter_documents,
    iter_tar_samples,
    iter_texts,
    jsonl_documents,
    write_documents,
)


def image(seed, size=20):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def docs(n):
    return [
        (f"doc{i}", [f"text {i} é 🙂", image(i), "after"] if i % 2 else [f"only text {i}"], {"i": i}) for i in range(n)
    ]


def same_doc(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, str):
            assert x == y
        else:
            assert np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))


def test_write_read_round_trip_size_limits_and_determinism(tmp_path):
    src = docs(9)
    paths = write_documents(src, tmp_path / "a", max_count=4, meta={"source": "test"})
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list((tmp_path / "a").glob(".*tmp"))
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["samples"] == 9 and [s["count"] for s in index["shards"]] == [4, 4, 1] and index["source"] == "test"
    got = list(iter_documents(str(tmp_path / "a" / "*.tar")))
    assert [k for k, _ in got] == [k for k, _, _ in src]
    for (_, want, _), (_, have) in zip(src, got):
        same_doc(want, have)
    assert list(iter_texts(tmp_path / "a")) == [s for _, d, _ in src for s in d if isinstance(s, str)]
    with tarfile.open(paths[0]) as tar:  # plain webdataset layout: KEY.json, KEY.0.png, KEY.meta.json
        assert tar.getnames()[:4] == ["doc0.json", "doc0.meta.json", "doc1.0.png", "doc1.json"]
    write_documents(src, tmp_path / "b", max_count=4)
    assert paths[1].read_bytes() == (tmp_path / "b" / "shard-000001.tar").read_bytes()
    big = write_documents(src, tmp_path / "c", max_size=3000)  # size-limited: images force new shards
    assert len(big) > 3 and all(p.stat().st_size < 3000 + 10240 for p in big)


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    write_documents(docs(4), tmp_path, max_count=10)
    samples = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["doc0", "doc1", "doc2", "doc3"]
    assert json.loads(samples[1]["json"]) == [{"text": "text 1 é 🙂"}, {"image": "0.png"}, {"text": "after"}]


def test_corruption_is_skipped_and_counted(tmp_path):
    write_documents(docs(12), tmp_path, max_count=4)
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: 512 * 7])  # cut at a block boundary
    truncate(tmp_path / "shard-000002.tar", 0.5)
    (tmp_path / "shard-000003.tar").write_bytes(b"\x00garbage" * 300)
    w = ShardWriter(tmp_path, prefix="bad")
    w.write("broken", {"json": b'[{"text": '})
    w.write("badimg", document_members(["x", image(0)]) | {"0.png": b"nope"})
    w.write("fine", document_members(["fine"]))
    w.close()
    stats = ReadStats()
    keys = [k for k, _ in iter_documents(str(tmp_path / "*.tar"), stats)]
    assert keys[:5] == ["fine", "doc0", "doc1", "doc2", "doc3"]  # bad-*.tar sorts first
    assert set(keys[5:]) < {"doc8", "doc9", "doc10", "doc11"}  # what the truncation left of shard 2
    assert stats.bad_shards == 3 and stats.bad_samples == 1 and stats.bad_images == 1
    assert len(keys) < 12 and len(stats.problems) == 5


def test_paths_and_bad_inputs(tmp_path):
    write_documents(docs(2), tmp_path / "s")
    assert expand_paths(str(tmp_path / "s" / "shard-{000000..000000}.tar")) == [
        str(tmp_path / "s" / "shard-000000.tar")
    ]
    for bad, msg in (
        (tmp_path / "none-*.tar", "no shards match"),
        (tmp_path / "missing.tar", "not found"),
        ([], "no shard paths"),
    ):
        with pytest.raises(InterleafError, match=msg):
            expand_paths(bad if isinstance(bad, list) else str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterleafError, match="no .tar shards"):
        expand_paths(str(tmp_path / "empty"))


def test_jsonl_and_folder_sources(tmp_path, capsys):
    image(1).save(tmp_path / "cat.png")
    good = tmp_path / "docs.jsonl"
    good.write_text(
        json.dumps(["hello", {"image": "cat.png"}, {"text": "bye"}])
        + "\n\n"
        + json.dumps({"segments": [{"text": "solo"}], "key": "k2", "meta": {"a": 1}})
        + "\n"
    )
    got = jsonl_documents(good)
    assert [k for k, _, _ in got] == ["docs-00000001", "k2"] and got[0][1][1] == tmp_path / "cat.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(["ok"]) + "\n{not json\n")
    assert main(["shards", "jsonl", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2: not valid JSON" in err[0]
    assert not (tmp_path / "out").exists()  # nothing written
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(["x", {"image": "nope.png"}]) + "\n")
    with pytest.raises(InterleafError, match="missing.jsonl:1: segment 1: image not found"):
        jsonl_documents(missing)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(3):
        image(i).save(pairs / f"x{i}.png")
        (pairs / f"x{i}.txt").write_text(f"caption {i}\n")
    assert main(["shards", "folder", str(pairs), "-o", str(tmp_path / "p"), "--max-count", "2"]) == 0
    got = list(iter_documents(tmp_path / "p"))
    assert [d[0] for _, d in got] == ["caption 0", "caption 1", "caption 2"] and len(
        list((tmp_path / "p").glob("*.tar"))
    ) == 2
    (pairs / "lonely.png").write_bytes((pairs / "x0.png").read_bytes())
    assert main(["shards", "folder", str(pairs), "-o", str(tmp_path / "q")]) == 2
    assert "no caption file" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("line one\n\nline two\n")
    assert main(["shards", "text", str(tmp_path / "t.txt"), "--per-line", "-o", str(tmp_path / "t")]) == 0
    assert list(iter_texts(tmp_path / "t")) == ["line one", "line two"]


def test_tokenize_matches_the_multimodal_tokenizer(tmp_path, capsys):
    from interleaf.training.tokenize import load_tokenizer_dir, parse_token_doc

    tok_dir = tmp_path / "tok"
    vocab = make_tokenizer_dir(tok_dir)
    assert (
        main(
            [
                "shards",
                "shapes",
                "--count",
                "12",
                "--resolution",
                "32",
                "--max-count",
                "5",
                "-o",
                str(tmp_path / "docs"),
            ]
        )
        == 0
    )
    w = ShardWriter(tmp_path / "docs", prefix="zz")  # one more shard holding an undecodable image
    w.write("bad", document_members(["a", image(0)]) | {"0.png": b"garbage"})
    w.write("ok", document_members(["a red circle", image(3)]))
    w.close()
    assert (
        main(["tokenize", str(tmp_path / "docs"), "-o", str(tmp_path / "tok0"), "--tokenizer", str(tok_dir), "--quiet"])
        == 0
    )
    assert "13 documents" in capsys.readouterr().out
    mm = load_tokenizer_dir(tok_dir).multimodal()
    want = {k: mm.encode(d) for k, d in iter_documents(tmp_path / "docs")}
    got = {}
    for p in sorted((tmp_path / "tok0").glob("*.tar")):
        for key, members in iter_tar_samples(str(p)):
            got[key] = parse_token_doc(key, members, vocab.size)
    assert set(got) == set(want) and "bad" not in got
    for key, doc in got.items():
        assert doc.ids.tolist() == want[key]
        kinds = [k for k, _, _ in doc.segs.tolist()]
        assert doc.ids[doc.segs[kinds.index(1), 1]] == vocab.boi_id if 1 in kinds else True
    index = json.loads((tmp_path / "tok0" / "index.json").read_text())
    assert index["vocab"] == vocab.to_dict() and index["documents"] == 13 and index["skipped"]["bad_images"] == 1
    # worker processes give the same shards
    assert (
        main(
            [
                "tokenize",
                str(tmp_path / "docs"),
                "-o",
                str(tmp_path / "tok2"),
                "--tokenizer",
                str(tok_dir),
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    for p in (tmp_path / "tok0").glob("*.tar"):
        assert p.read_bytes() == (tmp_path / "tok2" / p.name).read_bytes()
    assert (
        main(["tokenize", str(tmp_path / "nothing*.tar"), "-o", str(tmp_path / "x"), "--tokenizer", str(tok_dir)]) == 2
    )
    assert "no shards match" in capsys.readouterr().err


def _one_line_error(capsys, argv, message, code=2):
    assert main(list(map(str, argv))) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[-1] and "Traceback" not in "".join(err), err


def test_shards_output_is_all_or_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    lines = [json.dumps({"key": k, "segments": [f"text {k}"]}) for k in ("a", "b", "a")]
    (tmp_path / "dup.jsonl").write_text("\n".join(lines))
    _one_line_error(
        capsys, ["shards", "jsonl", tmp_path / "dup.jsonl", "-o", out, "--max-count", "1"], "duplicate document key 'a'"
    )
    assert not out.exists()
    (tmp_path / "three.jsonl").write_text("\n".join(lines[:2] + [json.dumps(["c"])]))
    assert main(["shards", "jsonl", str(tmp_path / "three.jsonl"), "-o", str(out), "--max-count", "1"]) == 0
    assert len(list(out.glob("*.tar"))) == 3
    # again into the same folder with fewer documents: the folder holds the new shards only
    (tmp_path / "one.jsonl").write_text(lines[0])
    assert main(["shards", "jsonl", str(tmp_path / "one.jsonl"), "-o", str(out), "--max-count", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    assert [k for k, _ in iter_documents(out)] == ["a"]
    # an interrupt half-way leaves the earlier shards as they were, and no temp folder
    import interleaf.training.shards as S

    real, calls = S.document_members, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "document_members", interrupted)
    assert main(["shards", "jsonl", str(tmp_path / "three.jsonl"), "-o", str(out), "--max-count", "1"]) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]
    assert not list(tmp_path.glob(".tmp-*"))
    # a folder holding other files is not taken over
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(capsys, ["shards", "jsonl", tmp_path / "one.jsonl", "-o", tmp_path / "mine"], "holds other files")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_shards_bad_inputs_are_one_line(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    image(1).save(pairs / "x.png")
    (pairs / "x.txt").write_bytes(b"\xffcaption")
    _one_line_error(capsys, ["shards", "folder", pairs, "-o", tmp_path / "o"], "not UTF-8 text")
    (pairs / "x.txt").write_text("a caption")
    (pairs / "y.png").write_text("not an image")
    (pairs / "y.txt").write_text("another")
    _one_line_error(capsys, ["shards", "folder", pairs, "-o", tmp_path / "o"], "y.png: not a readable image")
    (tmp_path / "bin.jsonl").write_bytes(b'["ok"]\n\xff\n')
    _one_line_error(capsys, ["shards", "jsonl", tmp_path / "bin.jsonl", "-o", tmp_path / "o"], "not UTF-8 text")
    for size in ("nan", "inf", "-1"):
        _one_line_error(
            capsys, ["shards", "shapes", "--count", "2", "--max-size", size, "-o", tmp_path / "o"], "cannot read size"
        )
    _one_line_error(
        capsys,
        ["shards", "shapes", "--count", "2", "--resolution", "100000", "-o", tmp_path / "o"],
        "24 to 4096 pixels",
    )
    (tmp_path / "afile").write_text("")
    _one_line_error(
        capsys, ["shards", "shapes", "--count", "2", "-o", tmp_path / "afile"], "exists and is not a folder"
    )
    _one_line_error(
        capsys, ["shards", "shapes", "--count", "2", "-o", "/proc/interleaf-shards"], "cannot write in /proc"
    )
    assert not (tmp_path / "o").exists()
    # text files of the same name in different folders are different documents
    for sub in ("b1", "b2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "ch1.txt").write_text(f"the first chapter of {sub}")
    assert (
        main(
            [
                "shards",
                "text",
                str(tmp_path / "b1" / "ch1.txt"),
                str(tmp_path / "b2" / "ch1.txt"),
                "-o",
                str(tmp_path / "books"),
            ]
        )
        == 0
    )
    assert sorted(k for k, _ in iter_documents(tmp_path / "books")) == ["b1_ch1_txt", "b2_ch1_txt"]


def test_tokenize_refuses_bad_destinations_and_empty_results(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    make_tokenizer_dir(tok_dir)
    assert main(["shards", "shapes", "--count", "3", "--resolution", "32", "-o", str(tmp_path / "docs")]) == 0
    capsys.readouterr()
    base = ["tokenize", tmp_path / "docs", "--tokenizer", tok_dir, "--quiet"]
    _one_line_error(capsys, [*base, "-o", tmp_path / "docs"], "holds the input")
    _one_line_error(capsys, [*base, "-o", tmp_path / "t", "--device", "bogus"], "is not a device")
    (tmp_path / "a.txt").write_text("not a shard")
    _one_line_error(
        capsys,
        ["tokenize", tmp_path / "a.txt", "--tokenizer", tok_dir, "-o", tmp_path / "t", "--quiet"],
        "no document could be tokenized (1 bad shards)",
    )
    assert not (tmp_path / "t").exists() and len(list((tmp_path / "docs").glob("*.tar"))) == 1


def test_shards_into_a_folder_another_prefix_shares_is_refused(tmp_path, capsys):
    out = tmp_path / "pf"
    assert main(["shards", "shapes", "--count", "2", "--resolution", "32", "-o", str(out), "--prefix", "a"]) == 0
    _one_line_error(
        capsys,
        ["shards", "shapes", "--count", "2", "--resolution", "32", "-o", out, "--prefix", "b"],
        "holds shards of another --prefix (a-000000.tar)",
    )
    (out / "index.json").write_text(json.dumps({"shards": []}))  # as if another writer's index
    _one_line_error(
        capsys,
        ["shards", "shapes", "--count", "2", "--resolution", "32", "-o", out, "--prefix", "b"],
        "does not list (a-000000.tar)",
    )
    assert (out / "a-000000.tar").is_file()
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        (tmp_path / d / "train.jsonl").write_text(json.dumps(["text"]))
    # JSONL files of the same name too: documents without a key get path-based keys
    assert (
        main(
            [
                "shards",
                "jsonl",
                str(tmp_path / "x" / "train.jsonl"),
                str(tmp_path / "y" / "train.jsonl"),
                "-o",
                str(tmp_path / "j"),
            ]
        )
        == 0
    )
    assert sorted(k for k, _ in iter_documents(tmp_path / "j")) == ["x_train_jsonl-00000001", "y_train_jsonl-00000001"]
    capsys.readouterr()
    _one_line_error(
        capsys,
        [
            "shards",
            "jsonl",
            tmp_path / "x" / "train.jsonl",
            tmp_path / "x" / ".." / "x" / "train.jsonl",
            "-o",
            tmp_path / "j2",
        ],
        f"is given twice (also as {tmp_path / 'x' / 'train.jsonl'})",
    )
    _one_line_error(
        capsys,
        ["shards", "text", tmp_path / "b1" / "ch1.txt", tmp_path / "b1" / "ch1.txt", "-o", tmp_path / "j2"],
        f"input {tmp_path / 'b1' / 'ch1.txt'} is given twice",
    )
    assert not (tmp_path / "j2").exists()
