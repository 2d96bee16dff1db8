import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from interleaf import cli
from interleaf.config import load_config
from interleaf.errors import ConfigError, InterleafError
from interleaf.model import ops, transformer
from interleaf.model.args import MODEL_SIZES, ModelArgs, count_params, ffn_hidden_size, flops_per_token
from interleaf.model.attention import build_cache_mask, xformers_available
from interleaf.model.transformer import HeadLayerNorm, RMSNorm, Transformer

ROOT = Path(__file__).resolve().parents[1]

# Small variants that together set every ModelArgs option away from its default.
VARIANTS = {
    "gqa-layernorm-pre": dict(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, qk_norm="layernorm", max_seq_len=64
    ),
    "mqa-rms-swin-tied": dict(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=64,
        ffn_hidden=40,
        qk_norm="rms",
        qk_norm_eps=1e-4,
        norm_order="swin",
        tie_embeddings=True,
        norm_eps=1e-6,
        rope_theta=500.0,
        max_seq_len=64,
    ),
    "mha-none": dict(
        dim=24,
        n_layers=1,
        n_heads=2,
        vocab_size=50,
        ffn_multiplier=1.5,
        multiple_of=8,
        init_std=0.05,
        loss_chunk=5,
        z_loss=1e-3,
        attention="sdpa",
        max_seq_len=64,
    ),
}
# options exercised by dedicated tests below (dropout: test_dropout_only_in_training)
EXERCISED = {k for v in VARIANTS.values() for k in v} | {"dropout"}


def make(name: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**VARIANTS[name], **overrides}))
    with torch.no_grad():  # non-trivial norm parameters, so permutation or layout bugs show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_every_option_is_exercised():
    assert EXERCISED == {f.name for f in dataclasses.fields(ModelArgs)}


def test_named_sizes_match_yaml_configs():
    for name in MODEL_SIZES:
        from_yaml = load_config(ModelArgs, ROOT / "configs" / "model" / f"{name}.yaml")
        assert from_yaml == ModelArgs.from_name(name) == MODEL_SIZES[name]
    a = ModelArgs.from_name("chameleon-7b")
    assert (a.ffn_hidden, a.head_dim, a.qk_norm, a.norm_order) == (11008, 128, "layernorm", "pre")
    assert ModelArgs.from_name("chameleon-34b").ffn_hidden == 22016
    assert ModelArgs.from_name("100M", dim=1152).ffn_hidden == ffn_hidden_size(1152)  # re-derived
    with pytest.raises(ConfigError, match="unknown model size"):
        ModelArgs.from_name("13B")


def test_ffn_width_and_validation():
    assert ffn_hidden_size(4096) == 11008
    assert ModelArgs(dim=96, multiple_of=32, ffn_multiplier=1.5).ffn_hidden == 384  # int(1.5 * 256) = 384
    assert Transformer(ModelArgs(**VARIANTS["mqa-rms-swin-tied"])).layers[0].feed_forward.w1.weight.shape == (40, 32)
    for bad, msg in [
        (dict(dim=30, n_heads=4), "not divisible"),
        (dict(n_heads=4, n_kv_heads=3), "multiple of"),
        (dict(dim=12, n_heads=4), "even"),
        (dict(dropout=1.0), "dropout"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            ModelArgs(**bad).validate()


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_and_flops(name):
    model = make(name)
    a = model.args
    assert count_params(a) == sum(p.numel() for p in model.parameters())
    assert count_params(a, embeddings=False) == count_params(a) - a.vocab_size * a.dim
    # by hand: 2 FLOPs per weight of the blocks and head, causal attention 2*T*dim per layer, x3 for training
    hd, T = a.head_dim, 10
    weights = a.n_layers * (2 * a.dim * a.n_heads * hd + 2 * a.dim * a.n_kv_heads * hd + 3 * a.dim * a.ffn_hidden)
    want = 3 * (2 * (weights + a.dim * a.vocab_size) + a.n_layers * 2 * T * a.dim)
    assert flops_per_token(a, T) == want


def test_init_std():
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=512, init_std=0.05))
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.05 / 2, rel=0.05)
    assert model.norm.weight.eq(1).all()


# ---- the function itself ----------------------------------------------------------------------
def test_norms_match_reference_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, generator=g)
    norm = RMSNorm(6, eps=0.5)
    norm.weight.data = torch.randn(6, generator=g)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    ln = HeadLayerNorm(4, 6, eps=0.3)
    ln.weight.data, ln.bias.data = torch.randn(2, 4, 6, generator=g)
    want = torch.stack([F.layer_norm(x[:, :, h], (6,), ln.weight[h], ln.bias[h], 0.3) for h in range(4)], dim=2)
    torch.testing.assert_close(ln(x), want)


def test_fused_ops_match_reference_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    cases = [
        (lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: ops.rms_norm_reference(x, w, 1e-5), [(3, 5, 8), (8,)]),
        (lambda h: ops.swiglu(h), lambda h: ops.swiglu_reference(h), [(3, 5, 12)]),
    ]
    cos, sin = ops.rope_angles(torch.arange(5)[None], 8, 100.0)
    cases.append(
        (lambda x: ops.apply_rope(x, cos, sin), lambda x: ops.apply_rope_reference(x, cos, sin), [(1, 5, 3, 8)])
    )
    for fast, ref, shapes in cases:
        xs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
        torch.testing.assert_close(fast(*xs), ref(*xs))
        assert torch.autograd.gradcheck(fast, xs)
        ga = torch.autograd.grad(fast(*xs).square().sum(), xs)
        gb = torch.autograd.grad(ref(*xs).square().sum(), xs)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


def test_rope_angles_by_hand_and_theta():
    cos, sin = ops.rope_angles(torch.tensor([[3]]), head_dim=4, theta=100.0)
    assert cos.flatten().tolist() == pytest.approx([math.cos(3), math.cos(3 / 10)], rel=1e-6)
    assert sin.flatten().tolist() == pytest.approx([math.sin(3), math.sin(3 / 10)], rel=1e-6)
    x = torch.tensor([[[[1.0, 0.0, 0.0, 1.0]]]])  # pairs (1, 0) and (0, 1)
    y = ops.apply_rope(x, cos, sin).flatten().tolist()
    assert y == pytest.approx([math.cos(3), math.sin(3), -math.sin(0.3), math.cos(0.3)], rel=1e-6)


def test_swin_block_is_norm_after_branch():
    model = make("mqa-rms-swin-tied")
    block = model.layers[0]
    x = torch.randn(1, 5, 32)
    cos, sin = ops.rope_angles(torch.arange(5)[None], 8, 500.0)
    from interleaf.model.attention import build_mask

    mask = build_mask("sdpa", None, 5)
    h = x + block.attention_norm(block.attention(x, cos, sin, mask))
    want = h + block.ffn_norm(block.feed_forward(h))
    torch.testing.assert_close(block(x, cos, sin, mask), want)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_equals_separate(name):
    model = make(name)
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4, 11]
    docs = [torch.randint(0, model.args.vocab_size, (1, n), generator=g) for n in lengths]
    alone = torch.cat([model(d) for d in docs], dim=1)
    row = torch.cat(docs, dim=1)
    doc_ids = torch.repeat_interleave(torch.tensor([5, 2, 8]), torch.tensor(lengths))[None]
    # a second row: the same documents in another order, so rows differ in their packing
    row2 = torch.cat([docs[2], docs[0], docs[1]], dim=1)
    ids2 = torch.repeat_interleave(torch.tensor([0, 1, 2]), torch.tensor([11, 9, 4]))[None]
    packed = model(torch.cat([row, row2]), torch.cat([doc_ids, ids2]))
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        packed[1], torch.cat([alone[:, 13:], alone[:, :9], alone[:, 9:13]], 1)[0], rtol=1e-5, atol=1e-5
    )
    # and the loss of the packed row is the loss of the documents
    targets = torch.randint(0, model.args.vocab_size, row.shape, generator=g)
    with torch.no_grad():
        a = model.loss(row, targets, doc_ids=doc_ids)
        b = model.loss(torch.cat([d for d in docs], 1), targets, doc_ids=doc_ids)
    assert float(a.loss) == pytest.approx(float(b.loss))
    assert not torch.allclose(model(row)[0, 9:], alone[0, 9:], atol=1e-3)  # unpacked: later docs see earlier ones


# ---- decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa-layernorm-pre", "mqa-rms-swin-tied"])
@pytest.mark.parametrize("inference", [False, True], ids=["grad", "no_grad"])
def test_kv_cache_decoding_equals_full_forward(name, inference):
    # no_grad takes the inference fast paths (fused weights, plain norms, prefix-only attention)
    with torch.set_grad_enabled(not inference):
        _check_cached_decoding(name)


def _check_cached_decoding(name, max_len=32, chunks=((5, 2, 9), (3, 0, 1)), device="cpu", tol=1e-5, **overrides):
    model = make(name, **overrides).to(device)
    B, total = 3, 24
    g = torch.Generator().manual_seed(4)
    seqs = torch.randint(0, model.args.vocab_size, (B, total), generator=g).to(device)
    full = model(seqs)  # (B, total, V)
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            torch.testing.assert_close(full, model(seqs), rtol=tol / 10, atol=tol / 10)
    cache = model.setup_cache(B, max_len)
    got = torch.zeros_like(full)
    done = torch.zeros(B, dtype=torch.long)

    def feed(n_new):
        width = int(n_new.max())
        tokens = torch.zeros(B, width, dtype=torch.long, device=device)  # right padding: ignored
        for b in range(B):
            tokens[b, : n_new[b]] = seqs[b, done[b] : done[b] + n_new[b]]
        out = model.decode(tokens, cache, n_new.to(device))
        for b in range(B):
            got[b, done[b] : done[b] + n_new[b]] = out[b, : n_new[b]]
        done.add_(n_new)

    for n_new in chunks:  # default: a prefill of different prompt lengths, then several tokens
        feed(torch.tensor(n_new))  # for some rows and none for another
    while int(done.min()) < total:
        feed((done < total).long())  # one token per unfinished row
    assert cache.lengths.tolist() == [total] * B
    torch.testing.assert_close(got, full, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["gqa-layernorm-pre", "mqa-rms-swin-tied"])
def test_xformers_backend_computes_the_same_model(name, xformers_on_cpu, monkeypatch):
    """The xformers path of the whole model, xformers' reference attention in place of its kernels."""
    steps = []

    def recorded(backend, lengths, T, *args, **kwargs):
        mask = build_cache_mask(backend, lengths, T, *args, **kwargs)
        steps.append((T, mask.backend))
        return mask

    monkeypatch.setattr(transformer, "build_cache_mask", recorded)
    _check_xformers_equals_sdpa(name, "cpu", tol=1e-5)
    assert (15, "xformers") in steps and (20, "sdpa") in steps  # the fullest chunk the mask holds; one past it
    assert {b for T, b in steps if T == 1} == {"xformers", "sdpa"}  # without gradients; with them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
@pytest.mark.parametrize("name", ["gqa-layernorm-pre", "mqa-rms-swin-tied"])
def test_xformers_model_equals_sdpa_on_cuda(name):
    """The same with xformers' real kernels (fp32)."""
    _check_xformers_equals_sdpa(name, "cuda", tol=1e-4)


def _check_xformers_equals_sdpa(name, device, tol):
    """Plain and packed forward passes, cached decoding (also with rows appending tokens near
    full) and a packed training pass's gradients: the same with xformers as with SDPA."""
    sdpa, xf = make(name).to(device), make(name, attention="xformers").to(device)  # the same seed: the same weights
    assert sdpa.backend(device) == "sdpa" and xf.backend(device) == "xformers"
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, sdpa.args.vocab_size, (2, 30), generator=g).to(device)
    doc_ids = torch.cumsum((torch.rand(2, 30, generator=g) < 0.15).long(), 1).to(device)
    with torch.no_grad():
        torch.testing.assert_close(xf(tokens), sdpa(tokens), rtol=tol, atol=tol)
        torch.testing.assert_close(xf(tokens, doc_ids), sdpa(tokens, doc_ids), rtol=tol, atol=tol)
        _check_cached_decoding(name, device=device, tol=tol, attention="xformers")
        # a cache just the sequences' size: the third chunk (15 wide) takes row 2 to its last slot,
        # padding into the scratch slot; in the second run it is 20 wide, past the slots of rows 0
        # and 2, so that step attends with SDPA
        for third in ((10, 15, 14), (15, 20, 12)):
            _check_cached_decoding(
                name, max_len=24, chunks=((5, 2, 9), (3, 0, 1), third), device=device, tol=tol, attention="xformers"
            )
    _check_cached_decoding(name, device=device, tol=tol, attention="xformers")  # with gradients: SDPA
    grads = []
    for model in (xf.train(), sdpa.train()):
        model.loss(tokens, tokens.roll(-1, 1), doc_ids=doc_ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=10 * tol, atol=tol / 10, msg=n)


def test_last_only_and_fork_rows():
    model = make("gqa-layernorm-pre")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 64, (1, 7), generator=g)
    cache = model.setup_cache(3, 16)
    n_new = torch.tensor([7, 0, 0])
    tokens = torch.cat([prompt, torch.zeros(2, 7, dtype=torch.long)])
    out = model.decode(tokens, cache, n_new, last_only=True)
    torch.testing.assert_close(out[0], model(prompt)[0, -1], rtol=1e-5, atol=1e-5)
    cache.copy_rows([0, 0], [1, 2])  # fork row 0 into rows 1 and 2 (classifier-free guidance)
    assert cache.lengths.tolist() == [7, 7, 7]
    nxt = torch.randint(0, 64, (3, 1), generator=g)
    nxt[:] = nxt[0]
    step = model.decode(nxt, cache)
    torch.testing.assert_close(step[1], step[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step[0, 0], model(torch.cat([prompt, nxt[:1]], 1))[0, -1], rtol=1e-5, atol=1e-5)
    cache.reset([2])
    assert cache.lengths.tolist() == [8, 8, 0]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]
    assert cache.k.shape == (2, 3, 2, 16, 8)  # (n_layers, B, n_kv_heads, max_len, head_dim)


def test_cache_overflow_is_an_error():
    model = make("gqa-layernorm-pre")
    cache = model.setup_cache(2, 8)
    model.decode(torch.ones(2, 6, dtype=torch.long), cache)
    with pytest.raises(InterleafError, match="row 0 would hold 9 tokens, more than its max_len 8"):
        model.decode(torch.ones(2, 3, dtype=torch.long), cache, torch.tensor([3, 1]))
    with pytest.raises(InterleafError, match="copy_rows"):
        cache.copy_rows([0], [5])


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gqa-layernorm-pre", "mqa-rms-swin-tied"])
def test_gradcheck_float64(name):
    model = make(name, n_layers=1, dim=16, vocab_size=24, loss_chunk=4, z_loss=0.05).double()
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 24, (2, 6), generator=g)
    targets = torch.randint(0, 24, (2, 6), generator=g)
    targets[0, 1] = -100
    weights = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.5
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    names, params = zip(*model.named_parameters())

    def f(*ps):
        out = torch.func.functional_call(
            model, dict(zip(names, ps)), (tokens,), dict(targets=targets, weights=weights, doc_ids=doc_ids)
        )
        return out.loss

    assert torch.autograd.gradcheck(f, tuple(p.detach().clone().requires_grad_() for p in params), fast_mode=True)


def test_model_loss_parts():
    model = make("mha-none")  # z_loss 1e-3, loss_chunk 5
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50, (2, 9), generator=g)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    targets[1, :3] = -100
    weights = torch.rand(2, 9, generator=g) + 0.1
    is_image = torch.rand(2, 9, generator=g) > 0.5
    with torch.no_grad():
        out = model.loss(tokens, targets, weights, is_image=is_image)
    from interleaf.model.loss import cross_entropy_loss

    with torch.no_grad():
        ref = cross_entropy_loss(model(tokens), targets, weights, is_image, z_coef=1e-3)
    for name in ("loss", "ce", "z_loss", "text_loss", "image_loss"):
        assert float(getattr(out, name)) == pytest.approx(float(getattr(ref, name)), rel=1e-5), name
    assert int(out.n_tokens) == 15
    big = Transformer(dataclasses.replace(model.args, loss_chunk=1000))
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = big.loss(tokens, targets, weights).loss, model.loss(tokens, targets, weights).loss
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_dropout_only_in_training():
    model = make("gqa-layernorm-pre", dropout=0.3)
    tokens = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))
    model.eval()
    torch.testing.assert_close(model(tokens), make("gqa-layernorm-pre")(tokens), rtol=0, atol=0)


def test_inference_path_keeps_hooks_and_dropout():
    # without autograd a block calls its parts' forward functions, unless hooks need the module calls;
    # dropout still applies
    model = make("gqa-layernorm-pre", dropout=0.3)
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        plain = model(tokens)
        handle = model.layers[1].feed_forward.register_forward_hook(lambda module, inputs, out: 0 * out)
        no_ffn = model(tokens)
        handle.remove()
        torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)
        model.train()
        for layer in model.layers:
            layer.attention.dropout = 0.0  # only the blocks' residual dropout is left
        assert not torch.allclose(model(tokens), model(tokens))  # dropout, though nothing records a graph
        model.eval()
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
        model(tokens)
        handle.remove()
        assert "FeedForward" in seen and "Attention" in seen  # a global hook sees every part
        model.eval()
        model.layers[1].feed_forward.w2.weight.zero_()  # the hook's effect by hand: no feed-forward branch
        torch.testing.assert_close(model(tokens), no_ffn, rtol=1e-6, atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    model = make("mqa-rms-swin-tied")
    assert model.output.weight is model.tok_embeddings.weight


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly():
    model = make("gqa-layernorm-pre")
    cases = [
        (torch.tensor([[1, 64]]), "token id 64 is outside the vocabulary \\[0, 64\\)"),
        (torch.tensor([[-3, 1]]), "token id -3 is outside the vocabulary"),
        (torch.zeros(1, 65, dtype=torch.long), "65 tokens is longer than max_seq_len=64"),
        (torch.zeros(4, dtype=torch.long), "shape \\(batch, seq\\)"),
        (torch.zeros(1, 4), "integer ids"),
    ]
    for tokens, msg in cases:
        with pytest.raises(InterleafError, match=msg):
            model(tokens)
    with pytest.raises(InterleafError, match="doc_ids shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(InterleafError, match="targets shape"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        make("gqa-layernorm-pre", attention="xformers")(torch.zeros(1, 4, dtype=torch.long))


# ---- model directories ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_tokenizer():
    from interleaf.tokenizer.text import train_bpe

    return train_bpe(["a red circle", "two blue squares", "a green triangle"] * 5, vocab_size=300)


def save_dir(tmp_path, model_name, text_tokenizer):
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.vocab import Vocabulary

    vocab = Vocabulary.build(n_text=text_tokenizer.vocab_size, n_codes=16, image_grid=(2, 2))
    model = make(model_name, vocab_size=vocab.size)
    save_model_dir(tmp_path / "m", model, vocab, text_tokenizer)
    return model, tmp_path / "m"


@pytest.mark.parametrize("name", ["gqa-layernorm-pre", "mqa-rms-swin-tied"])
def test_save_and_load_model_dir(tmp_path, text_tokenizer, name):
    from safetensors import safe_open

    import interleaf

    model, d = save_dir(tmp_path, name, text_tokenizer)
    pipe = interleaf.load(d)
    assert pipe.vqgan is None and pipe.vocab.size == model.args.vocab_size and pipe.model.args == model.args
    assert pipe.text.encode("a red circle") == text_tokenizer.encode("a red circle")
    tokens = torch.randint(0, model.args.vocab_size, (2, 11))
    torch.testing.assert_close(pipe.model(tokens), model(tokens), rtol=0, atol=0)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert ("output.weight" in f.keys()) == (not model.args.tie_embeddings)
    if model.args.tie_embeddings:
        assert pipe.model.output.weight is pipe.model.tok_embeddings.weight
    half = interleaf.load(d, dtype="bfloat16")
    assert half.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_mismatched_model_dir_fails_clearly(tmp_path, text_tokenizer):
    from safetensors.torch import load_file, save_file

    import interleaf

    _, d = save_dir(tmp_path, "gqa-layernorm-pre", text_tokenizer)
    state = load_file(str(d / "model.safetensors"))
    yaml_text = (d / "model.yaml").read_text()
    (d / "model.yaml").write_text(yaml_text.replace("n_layers: 2", "n_layers: 3"))
    with pytest.raises(InterleafError, match="missing tensor layers.2"):
        interleaf.load(d)
    (d / "model.yaml").write_text(yaml_text.replace("ffn_hidden: 96", "ffn_hidden: 80"))
    with pytest.raises(
        InterleafError, match=r"feed_forward.w1.weight has shape \(96, 32\), model.yaml implies \(80, 32\)"
    ):
        interleaf.load(d)
    (d / "model.yaml").write_text(yaml_text)
    save_file({**state, "extra.weight": torch.zeros(1)}, str(d / "model.safetensors"))
    with pytest.raises(InterleafError, match="unexpected tensor extra.weight"):
        interleaf.load(d)
    del state["norm.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(InterleafError, match="missing tensor norm.weight"):
        interleaf.load(d)
    with pytest.raises(InterleafError, match="not a model directory"):
        interleaf.load(tmp_path)


def test_generation_delegates_to_sampler(tmp_path, text_tokenizer, monkeypatch):
    import interleaf
    import interleaf.sampling.generate as generate

    _, d = save_dir(tmp_path, "gqa-layernorm-pre", text_tokenizer)
    pipe = interleaf.load(d)
    seen = []
    monkeypatch.setattr(generate, "stream", lambda p, prompt, **kw: seen.append(("stream", p, prompt, kw)))
    monkeypatch.setattr(generate, "generate", lambda p, prompt, **kw: seen.append(("generate", p, prompt, kw)))
    pipe.stream("hi", max_new_tokens=3)
    pipe.generate(["x"], mode="image")
    assert seen == [("stream", pipe, "hi", {"max_new_tokens": 3}), ("generate", pipe, ["x"], {"mode": "image"})]


def test_info_command(tmp_path, text_tokenizer, capsys):
    assert cli.main(["info", str(ROOT / "configs" / "model" / "debug.yaml")]) == 0
    n = count_params(ModelArgs.from_name("debug"))
    assert f"parameters: {n:,}" in capsys.readouterr().out
    model, d = save_dir(tmp_path, "gqa-layernorm-pre", text_tokenizer)
    assert cli.main(["info", str(d), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {count_params(model.args):,}" in out and "image grid 2x2" in out and "vqgan: none" in out
    assert cli.main(["info", "chameleon-7b", "n_layers=2"]) == 0
    assert "layers 2, dim 4096" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path / "nothing")]) == 2
    assert "not a model config file" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    for argv, message in [
        (["info", str(tmp_path / "empty.yaml")], "is empty"),
        (["info", str(tmp_path / "binary.yaml")], "not a UTF-8 text file"),
        (["info", "debug", "--seq-len", "0"], "--seq-len must be >= 1"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
