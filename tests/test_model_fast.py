"""The speed paths of model/fast.py against the reference model of model/transformer.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

from interleaf.config import save_config
from interleaf.model import fast
from interleaf.model.args import ModelArgs
from interleaf.model.fast import (
    FUSE_MIN_TOKENS,
    MATVEC_MAX_ROWS,
    SPLIT_MAX_ROWS,
    FusedWeight,
    apply_inference_fast_paths,
    apply_training_fast_paths,
)
from interleaf.model.init import RandomInit
from interleaf.model.transformer import Attention, FeedForward, OutputHead, Transformer, TransformerBlock
from interleaf.pipeline import ARGS_FILE, load_model, model_state, write_weights
from interleaf.training.engine import build_model

# every QK-norm, norm order, head grouping and a tied head; dims divisible by 2 threads, and one not
VARIANTS = {
    "gqa-layernorm-pre": dict(dim=32, n_heads=4, n_kv_heads=2, qk_norm="layernorm"),
    "mqa-rms-swin-tied": dict(
        dim=32, n_heads=4, n_kv_heads=1, ffn_hidden=40, qk_norm="rms", norm_order="swin", tie_embeddings=True
    ),
    "mha-none-odd": dict(dim=24, n_heads=2, ffn_hidden=45, qk_norm="none"),
}


def make(name: str, seed: int = 0) -> Transformer:
    args = ModelArgs(n_layers=2, vocab_size=64, multiple_of=8, max_seq_len=64, **VARIANTS[name])
    return Transformer(args, seed=seed).eval()


def pair(name: str) -> tuple[Transformer, Transformer]:
    """(reference, the same weights with the inference paths)."""
    ref = make(name)
    return ref, apply_inference_fast_paths(copy.deepcopy(ref))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def kept_weights(model: Transformer) -> list[FusedWeight]:
    out = [model.output._kept]
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        out += [a._wqkv, a._wo, f._w13, f._w2]
    return out


def test_applying_changes_classes_not_the_state_dict():
    for name in VARIANTS:
        model = make(name)
        before = model.state_dict(keep_vars=True)
        apply_inference_fast_paths(model)
        after = model.state_dict(keep_vars=True)
        assert list(after) == list(before)
        assert all(after[k] is before[k] for k in before)  # the same parameters, not copies
        assert type(model.layers[0].attention) is fast.InferenceAttention  # control: it did apply
        assert type(model.layers[1].feed_forward) is fast.InferenceFeedForward
        with torch.no_grad():
            model(torch.ones(1, 3, dtype=torch.long))  # kept layouts exist now: still not in the state dict
        assert list(model.state_dict()) == list(before)
        Transformer.from_state_dict(model.args, model_state(model))  # reads back as a reference model
        apply_inference_fast_paths(model)  # a second time: nothing to do
        assert type(model.layers[0].attention) is fast.InferenceAttention
    model = apply_training_fast_paths(make("gqa-layernorm-pre"))
    assert type(model.layers[0].attention) is fast.ConcatAttention
    assert list(model.state_dict()) == list(make("gqa-layernorm-pre").state_dict())


@torch.no_grad()
@pytest.mark.parametrize("name", list(VARIANTS))
def test_inference_paths_equal_reference(name, threads):
    ref, model = pair(name)
    g = torch.Generator().manual_seed(1)
    for batch, length in [(1, 1), (1, 7), (3, 5), (2, 33)]:  # products of 1 to 66 rows
        tokens = torch.randint(0, 64, (batch, length), generator=g)
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    for batch in (1, 2, 5, 8, 17):  # decode steps of 1, 2, MATVEC_MAX_ROWS + 2, 8, SPLIT_MAX_ROWS + 1 rows
        prompt = torch.randint(0, 64, (batch, 6), generator=g)
        caches = [m.setup_cache(batch, 16) for m in (ref, model)]
        for m, cache in zip((ref, model), caches):
            m.decode(prompt, cache)
        for _ in range(3):
            step = torch.randint(0, 64, (batch, 1), generator=g)
            want = ref.decode(step, caches[0])
            torch.testing.assert_close(model.decode(step, caches[1]), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)
    assert all(kept.key is not None for kept in kept_weights(model))  # control: every kept weight was used
    if threads == 2:  # and the split product ran, where the inputs divide between the threads
        assert all((kept.split is not None) == (kept.value.shape[1] % 2 == 0) for kept in kept_weights(model))


@torch.no_grad()
@pytest.mark.parametrize("threads", [2], indirect=True)
def test_inference_paths_are_taken(threads):
    # negative control: each kept (in, out) layout, changed behind the parameters' back, changes
    # the logits; so the comparisons above ran the fast paths, not the reference
    ref, model = pair("gqa-layernorm-pre")
    tokens = torch.randint(0, 64, (1, 1), generator=torch.Generator().manual_seed(2))  # one row: split products
    torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    for i, kept in enumerate(kept_weights(model)):
        saved = kept.value_t.clone()
        kept.value_t.mul_(1.5)
        assert not torch.allclose(model(tokens), ref(tokens), rtol=1e-3, atol=1e-3), i
        kept.value_t.copy_(saved)
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


def test_inference_paths_step_aside_for_autograd_and_hooks():
    ref, model = pair("mqa-rms-swin-tied")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    ref(tokens).sum().backward()
    model(tokens).sum().backward()  # parameters require grad: the reference path, with gradients
    assert all(kept.key is None for kept in kept_weights(model))
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)
    with torch.no_grad():  # hooks on a block's parts run as they do in the reference
        for m in (ref, model):
            m.layers[0].attention.register_forward_hook(lambda module, inputs, out: 2 * out)
            m.layers[1].ffn_norm.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 0.5,))
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
        # a replaced or hooked output projection runs its own forward
        x = torch.randn(1, 1, 16)
        with_bias = torch.nn.Linear(16, 48)
        torch.testing.assert_close(FusedWeight().apply(x, with_bias), with_bias(x))
        hooked = torch.nn.Linear(16, 48, bias=False)
        hooked.register_forward_hook(lambda module, inputs, out: 2 * out)
        torch.testing.assert_close(FusedWeight().apply(x, hooked), 2 * F.linear(x, hooked.weight))
        replaced = make("gqa-layernorm-pre")
        replaced.layers[0].attention.wq = torch.nn.Linear(32, 32)  # q/k/v as one product no longer computes it
        apply_inference_fast_paths(replaced)
        assert type(replaced.layers[0].attention) is Attention
        assert type(replaced.layers[1].attention) is fast.InferenceAttention


@torch.no_grad()
def test_inference_paths_see_weight_updates():
    model = apply_inference_fast_paths(make("gqa-layernorm-pre"))
    tokens = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(9))
    cache = model.setup_cache(1, 8)
    model.decode(tokens, cache)
    model.decode(tokens[:, :1], cache)  # one row: the decode layouts are kept too
    model.layers[0].attention.wq.weight.mul_(1.5)  # in place: fused weights must be rebuilt
    model.layers[0].feed_forward.w3.weight = torch.nn.Parameter(model.layers[0].feed_forward.w3.weight * 0.5)
    model.output.weight.mul_(0.5)
    model.layers[1].feed_forward.w2.weight.add_(0.1)
    cache.reset()
    got = model.decode(tokens[:, :4], cache)
    step = model.decode(tokens[:, 4:], cache)
    with torch.enable_grad():
        want = model(tokens)
    torch.testing.assert_close(got, want[:, :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, want[:, 4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kept_weight_products_equal_linear(threads):
    # the CPU decode layouts (transposed; split over threads) compute F.linear for any row count
    g = torch.Generator().manual_seed(0)
    for n_out, n_in in [(48, 16), (16, 48), (32, 32), (40, 15)]:
        parts = [torch.randn(n_out // 2, n_in, generator=g), torch.randn(n_out - n_out // 2, n_in, generator=g)]
        kept = FusedWeight()
        for rows in sorted({1, 2, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1, SPLIT_MAX_ROWS, SPLIT_MAX_ROWS + 1}):
            x = torch.randn(1, rows, n_in, generator=g)
            want = F.linear(x, torch.cat(parts))
            torch.testing.assert_close(kept.linear(x, *parts), want, rtol=1e-5, atol=1e-5)
        other_layout = n_in % threads == 0 and (threads > 1 or n_out > n_in)
        assert (kept.value_t is not None) == other_layout, (n_out, n_in)
        parts[0].mul_(-2)  # in place: the kept layouts follow
        x = torch.randn(1, 1, n_in, generator=g)
        torch.testing.assert_close(kept.linear(x, *parts), F.linear(x, torch.cat(parts)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kept_weights_only_where_they_compute_the_same():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 1, 16, generator=g), torch.randn(48, 16, generator=g)
    kept = FusedWeight()
    half = kept.linear(x.bfloat16(), w.bfloat16())
    assert kept.value_t is None and torch.equal(half, F.linear(x.bfloat16(), w.bfloat16()))  # CPU bmm is slow there
    managed = torch.nn.Parameter(w.clone())
    managed.ds_id = 0  # a ZeRO-3 parameter: gathered and released by its engine, never kept
    assert FusedWeight()(managed) is None and FusedWeight()(torch.empty(0, 16)) is None
    big = torch.empty(fast.FUSED_CACHE_MAX_BYTES // 4 + 1, 1)
    assert FusedWeight()(big) is None  # too large to keep twice


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_paths_equal_reference(name, monkeypatch):
    # the concatenated q/k/v and w1/w3 weights of a training pass off CPU, applied here on CPU
    ref = make(name).double().train()
    model = apply_training_fast_paths(copy.deepcopy(ref))
    calls, swiglu = [], fast.swiglu

    def counted_swiglu(h):  # only the concatenated feed-forward path calls it
        calls.append(h.shape)
        return swiglu(h)

    monkeypatch.setattr(fast, "swiglu", counted_swiglu)
    g = torch.Generator().manual_seed(3)
    for batch, length in [(2, FUSE_MIN_TOKENS // 2), (1, FUSE_MIN_TOKENS - 1)]:
        tokens = torch.randint(0, 64, (batch, length), generator=g)
        calls.clear()
        results = []
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            logits = m(tokens)
            logits.square().mean().backward()
            results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
        assert len(calls) == (model.args.n_layers if tokens.numel() >= FUSE_MIN_TOKENS else 0)  # control
        (fused, fused_grads), (separate, separate_grads) = results
        torch.testing.assert_close(fused, separate, rtol=1e-12, atol=1e-12)
        assert fused_grads.keys() == separate_grads.keys()
        for n in fused_grads:
            torch.testing.assert_close(fused_grads[n], separate_grads[n], rtol=1e-10, atol=1e-12, msg=n)


def test_the_sampler_loads_models_with_inference_paths(tmp_path):
    model = make("mqa-rms-swin-tied")
    write_weights(tmp_path, model_state(model))
    save_config(model.args, tmp_path / ARGS_FILE)
    loaded = load_model(tmp_path)
    assert isinstance(loaded.layers[0], TransformerBlock) and type(loaded.layers[0]) is fast.InferenceBlock
    assert isinstance(loaded.layers[0].attention, Attention) and isinstance(loaded.layers[0].feed_forward, FeedForward)
    assert type(loaded.output) is fast.InferenceHead and isinstance(loaded.output, OutputHead)
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_the_training_engine_applies_training_paths_off_cpu_only():
    args = make("gqa-layernorm-pre").args
    for device, want in (("cpu", Attention), ("meta", fast.ConcatAttention)):  # meta: any device but CPU
        model = build_model(args, {"zero_optimization": {"stage": 1}}, RandomInit(args, 0), torch.device(device))
        assert type(model.layers[0].attention) is want, device
