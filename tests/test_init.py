"""Initial weights as values by name (model/init.py): any range alone equals that range of the whole,
whatever splits it; the recipe's statistics; the same values on every construction path."""

import math

import pytest
import torch

from interleaf.model import init
from interleaf.model.args import ModelArgs
from interleaf.model.init import RandomInit
from interleaf.model.transformer import Transformer


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(init, "BLOCK", 64)  # tensors of the debug model span many blocks


def test_any_range_equals_that_range_of_the_whole(small_blocks):
    values = RandomInit(ModelArgs.from_name("debug"), seed=3)
    shape = (37, 29)  # 1073 values: 16 whole blocks and a partial one
    whole = values.read("layers.1.attention.wq.weight", shape, 0, 37 * 29)
    for start, stop in [(0, 1), (63, 65), (100, 1073), (640, 640), (1000, 1073)]:
        assert torch.equal(values.read("layers.1.attention.wq.weight", shape, start, stop), whole[start:stop])
    for world in (2, 3, 8):  # ZeRO-3's split: ceil(n / world) per rank, the last one short or empty
        n = math.ceil(whole.numel() / world)
        parts = [
            values.read("layers.1.attention.wq.weight", shape, r * n, min((r + 1) * n, 1073)) for r in range(world)
        ]
        assert torch.equal(torch.cat(parts), whole)
    other = RandomInit(ModelArgs.from_name("debug"), seed=4).read("layers.1.attention.wq.weight", shape, 0, 1073)
    assert not torch.equal(other, whole)
    assert not torch.equal(values.read("layers.1.attention.wk.weight", shape, 0, 1073), whole)


def test_the_recipe():
    args = ModelArgs.from_name("debug", dim=128, n_heads=4, n_layers=8, vocab_size=1024)
    model = Transformer(args, seed=0)
    residual = args.init_std / math.sqrt(2 * args.n_layers)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.zeros_like(p) if name.endswith(".bias") else torch.ones_like(p)), name
        else:
            std = residual if name.endswith(("wo.weight", "w2.weight")) else args.init_std
            assert abs(p.std().item() / std - 1) < 0.1 and abs(p.mean().item()) < std / 10, name
    with pytest.raises(KeyError, match="no initialisation rule for parameter layers.0.attention.wz.weight"):
        RandomInit(args, 0).std("layers.0.attention.wz.weight")


def test_the_same_weights_whatever_builds_them():
    args = ModelArgs.from_name("debug", tie_embeddings=True)
    a, b = Transformer(args, seed=5), Transformer(args, seed=5)
    values = RandomInit(args, 5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q) and torch.equal(p.flatten(), values.read(name, tuple(p.shape), 0, p.numel()))
    assert a.output.weight is a.tok_embeddings.weight
    torch.manual_seed(1)
    c = Transformer(args)  # no seed: one drawn from torch's generator, so seeded tests stay reproducible
    torch.manual_seed(1)
    assert torch.equal(Transformer(args).tok_embeddings.weight, c.tok_embeddings.weight)
    assert not torch.equal(c.tok_embeddings.weight, a.tok_embeddings.weight)
    with torch.device("meta"):
        assert Transformer(args).tok_embeddings.weight.is_meta  # nothing generated for the meta device
