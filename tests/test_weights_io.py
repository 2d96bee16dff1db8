"""Weights on disk: one safetensors file or shards with an index (Hugging Face's layout), one writer
(`write_weights`, streamed when given meta tensors) and one reader (`read_weights`)."""

import json

import pytest
import torch
from safetensors import safe_open

import interleaf
from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer
from interleaf.pipeline import INDEX_FILE, MODEL_FILE, model_state, read_weights, save_model_dir, write_weights
from interleaf.tokenizer.text import train_bpe
from interleaf.tokenizer.vocab import Vocabulary


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(16, 8, generator=g),
        "b": torch.randn(40, generator=g).bfloat16(),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.randn(3, 5, generator=g).half().t(),  # not contiguous
        "e": torch.tensor(True),
    }


def test_one_file_is_what_safetensors_reads(tmp_path):
    want = tensors()
    (path,) = write_weights(tmp_path, want)
    assert path == tmp_path / MODEL_FILE and not (tmp_path / INDEX_FILE).exists()
    with safe_open(str(path), "pt") as f:  # the reference reader
        assert sorted(f.keys()) == sorted(want) and f.metadata() == {"format": "pt"}
        for k, v in want.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype, k
    assert (path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")) == sum(
        v.numel() * v.element_size() for v in want.values()
    )


def test_shards_with_an_index_and_streamed_values(tmp_path):
    want = tensors()
    made = []

    def produce(name):
        made.append(name)
        return want[name]

    layout = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in want.items()}
    files = write_weights(tmp_path, layout, produce, shard_bytes=100)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert made == list(want)  # each value made once, in order
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(want) and index["weight_map"]["a"] == files[0].name
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    got = read_weights(tmp_path)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a later single-file write replaces the shards (no stale files for a reader to find)
    write_weights(tmp_path, {"a": want["a"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE] and list(read_weights(tmp_path)) == ["a"]


def test_sharded_model_directory_loads(tmp_path):
    text = train_bpe(["a red circle", "two blue squares"] * 5, vocab_size=280)
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=16, image_grid=(2, 2))
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=vocab.size, qk_norm="layernorm")
    torch.manual_seed(0)
    model = Transformer(args).eval()
    save_model_dir(tmp_path, model, vocab, text)
    write_weights(tmp_path, model_state(model), shard_bytes=20_000)
    assert not (tmp_path / MODEL_FILE).exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 3
    pipe = interleaf.load(tmp_path)
    loaded = pipe.model.state_dict()
    assert list(loaded) == list(model.state_dict()) and all(
        torch.equal(loaded[k], v) for k, v in model.state_dict().items()
    )
    ids = torch.randint(0, vocab.size, (2, 7))
    with torch.no_grad():  # the loaded model runs the inference paths of model/fast.py: equal to rounding
        torch.testing.assert_close(pipe.model(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_broken_shards_are_named(tmp_path):
    write_weights(tmp_path, tensors(), shard_bytes=100)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    (tmp_path / "model-00002-of-00003.safetensors").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(InterleafError, match=f"model-00002-of-00003.safetensors, a shard that .*{INDEX_FILE} names"):
        read_weights(tmp_path)
    (tmp_path / "elsewhere.bin").rename(tmp_path / "model-00002-of-00003.safetensors")
    index["weight_map"]["z"] = "model-00001-of-00003.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InterleafError, match="does not match its shards \\(tensor z\\)"):
        read_weights(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[]")
    with pytest.raises(InterleafError, match="is not a weight index"):
        read_weights(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterleafError, match="empty has no model.safetensors"):
        read_weights(tmp_path / "empty")
