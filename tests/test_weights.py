"""One path for weights: `Transformer.from_state_dict`, `expected_shapes`, and the vocabulary-fits check."""

import pytest
import torch

import interleaf
from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer, expected_shapes
from interleaf.pipeline import model_state, save_model_dir
from interleaf.tokenizer.text import train_bpe
from interleaf.tokenizer.vocab import Vocabulary

ARGS = {
    "untied": ModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, qk_norm="layernorm"
    ),
    "tied": ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=96, ffn_hidden=40, qk_norm="rms", tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(ARGS))
def test_from_state_dict_round_trip(name):
    args = ARGS[name]
    torch.manual_seed(0)
    model = Transformer(args).eval()
    state = model_state(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(args)  # a tied head stored once
    loaded = Transformer.from_state_dict(args, state).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.tok_embeddings.weight.data_ptr() == state["tok_embeddings.weight"].data_ptr()  # assigned, no copy
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == args.tie_embeddings


def test_tied_output_weight_may_come_along_only_when_equal():
    args = ARGS["tied"]
    state = model_state(Transformer(args))
    both = {**state, "output.weight": state["tok_embeddings.weight"].clone()}  # a consolidated training state
    model = Transformer.from_state_dict(args, both)
    assert model.output.weight is model.tok_embeddings.weight
    both["output.weight"] = both["output.weight"] + 1
    with pytest.raises(InterleafError, match="src: output.weight differs from tok_embeddings.weight"):
        Transformer.from_state_dict(args, both, "src")


def test_wrong_tensors_are_named():
    args = ARGS["untied"]
    state = model_state(Transformer(args))
    with pytest.raises(InterleafError, match=r"src: missing tensor layers.1.attention.wq.weight"):
        Transformer.from_state_dict(
            args, {k: v for k, v in state.items() if k != "layers.1.attention.wq.weight"}, "src"
        )
    with pytest.raises(InterleafError, match=r"src: unexpected tensor rope.freqs"):
        Transformer.from_state_dict(args, {**state, "rope.freqs": torch.zeros(4)}, "src")
    bad = {**state, "norm.weight": torch.ones(33)}
    with pytest.raises(InterleafError, match=r"src: tensor norm.weight has shape \(33,\), model.yaml implies \(32,\)"):
        Transformer.from_state_dict(args, bad, "src")


def test_a_vocabulary_larger_than_the_model_is_refused_at_load(tmp_path):
    text_tokenizer = train_bpe(["a red circle", "two blue squares"] * 5, vocab_size=280)
    vocab = Vocabulary.build(n_text=text_tokenizer.vocab_size, n_codes=16, image_grid=(2, 2))
    fits = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab.size)
    save_model_dir(tmp_path / "ok", Transformer(fits), vocab, text_tokenizer)
    assert interleaf.load(tmp_path / "ok").vocab.size == vocab.size  # control: the same vocabulary fits
    small = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab.size - 1)
    save_model_dir(tmp_path / "m", Transformer(small), vocab, text_tokenizer)
    with pytest.raises(
        InterleafError, match=f"the vocabulary's {vocab.size} ids do not fit the model's {vocab.size - 1}"
    ):
        interleaf.load(tmp_path / "m")
