import math

import pytest
import torch

import interleaf.model.attention as attention
from interleaf.errors import ConfigError
from interleaf.model.attention import (
    attend,
    blocked_attention,
    build_cache_mask,
    build_mask,
    cache_mask,
    document_lengths,
    document_positions,
    mask_from_lengths,
    packed_causal_mask,
    resolve_backend,
    segment_ids,
    xformers_available,
)

DOCS = torch.tensor([[7, 7, 7, 3, 3, 9, 9, 9, 9], [0, 0, 0, 0, 0, 0, 1, 1, 1]])


def naive_attention(q, k, v, allowed):
    """Softmax attention written out: q (B, T, H, hd), k/v (B, S, Hkv, hd), allowed (B, T, S) bool."""
    H, Hkv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def test_segments_and_positions_by_hand():
    assert segment_ids(DOCS).tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3], [1, 1, 1, 1, 1, 1, 2, 2, 2]]
    assert document_positions(DOCS).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert document_lengths(DOCS) == [3, 2, 4, 6, 3]


def test_repeated_id_after_another_document_is_a_new_document():
    ids = torch.tensor([[0, 0, 1, 1, 0]])
    assert document_positions(ids).tolist() == [[0, 1, 0, 1, 0]]
    assert not packed_causal_mask(ids)[0, 0, 4, :4].any()


def test_packed_mask_equals_block_diagonal_from_lengths():
    """The lengths handed to xformers' BlockDiagonalCausalMask describe the same mask as SDPA's."""
    B, T = DOCS.shape
    dense = packed_causal_mask(DOCS)[:, 0]  # (B, T, T)
    flat = mask_from_lengths(document_lengths(DOCS), B * T)  # all rows as one sequence
    want = torch.block_diag(*[m for m in dense.int()]).bool()
    assert torch.equal(flat, want)
    # by hand: row 0, token 4 (second of document "3") sees tokens 3 and 4 only
    assert dense[0, 4].nonzero().flatten().tolist() == [3, 4]


def test_cache_mask_by_hand():
    positions = torch.tensor([[2, 3], [0, 1]])  # row 0 has 2 cached tokens, row 1 none
    m = cache_mask(positions, n_keys=5, max_len=4)[:, 0]
    assert m[0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]  # key 4 is the scratch slot
    assert m[1].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    built = build_cache_mask("sdpa", torch.tensor([2, 0]), T=2, max_len=4).mask[:, 0]
    assert torch.equal(built, m)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_sdpa_packed_and_causal_equal_naive_attention(n_kv):
    g = torch.Generator().manual_seed(0)
    B, T, H, hd = DOCS.shape[0], DOCS.shape[1], 4, 8
    q = torch.randn(B, T, H, hd, generator=g)
    k, v = torch.randn(2, B, T, n_kv, hd, generator=g)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    out = attend(q, k, v, build_mask("sdpa", None, T))
    torch.testing.assert_close(out, naive_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)
    out = attend(q, k, v, build_mask("sdpa", DOCS, T))
    torch.testing.assert_close(out, naive_attention(q, k, v, packed_causal_mask(DOCS)[:, 0]), rtol=1e-5, atol=1e-6)


def test_sdpa_with_cache_mask_equals_naive_attention():
    g = torch.Generator().manual_seed(1)
    B, T, S, H, hd = 2, 3, 6, 2, 4
    q = torch.randn(B, T, H, hd, generator=g)
    k, v = torch.randn(2, B, S + 1, H, hd, generator=g)
    lengths = torch.tensor([1, 3])
    mask = build_cache_mask("sdpa", lengths, T, S)
    positions = lengths[:, None] + torch.arange(T)
    out = attend(q, k, v, mask)
    torch.testing.assert_close(
        out, naive_attention(q, k, v, cache_mask(positions, S + 1, S)[:, 0]), rtol=1e-5, atol=1e-6
    )


def random_docs(B, T, g):
    return torch.cumsum((torch.rand(B, T, generator=g) < 0.1).long(), 1)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_blocked_attention_equals_naive_attention_values_and_gradients(n_kv, monkeypatch):
    """Several blocks and a ragged last one (T = 23 with blocks of 8), causal and packed, with GQA."""
    monkeypatch.setattr(attention, "BLOCK_ROWS", 8)
    g = torch.Generator().manual_seed(2)
    B, T, H, hd = 2, 23, 4, 8
    q = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, T, n_kv, hd, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    docs = random_docs(B, T, g)
    grad = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    for doc_ids, allowed in ((None, causal), (docs, packed_causal_mask(docs)[:, 0])):
        mask = build_mask("sdpa", doc_ids, T)
        got = blocked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask.mask).transpose(1, 2)
        want = naive_attention(q, k, v, allowed)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    small = [t[:1, :10].detach().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_attention(q, k, v), tuple(t.transpose(1, 2) for t in small))


def test_attend_takes_the_blocked_path_only_for_cpu_training_within_budget(monkeypatch):
    calls = []
    real = attention.blocked_attention
    monkeypatch.setattr(attention, "blocked_attention", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    B, T, H, hd = 2, 16, 2, 4
    q, k, v = (torch.randn(B, T, H, hd, generator=g, requires_grad=True) for _ in range(3))
    mask = build_mask("sdpa", None, T)
    want = naive_attention(q, k, v, torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T))
    torch.testing.assert_close(attend(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    grad = torch.autograd.grad(attend(q, k, v, mask).sum(), q, create_graph=True)[0]  # first order only:
    with pytest.raises(RuntimeError):  # a second derivative is an error, never a wrong number
        torch.autograd.grad(grad.sum(), q)
    calls.clear()
    with torch.no_grad():  # inference: PyTorch's kernel
        attend(q, k, v, mask)
    attend(q, k, v, mask, dropout=0.1)
    scratch = torch.cat([k, k[:, :1]], 1)  # a cache of T slots and its scratch slot
    attend(q, scratch, scratch, build_cache_mask("sdpa", torch.zeros(B, dtype=torch.long), T, T))
    everywhere = torch.ones(B, 1, T, T, dtype=torch.bool)  # a mask that is not causal: SDPA's
    want_all = naive_attention(q, k, v, everywhere[:, 0])
    torch.testing.assert_close(
        attend(q, k, v, attention.AttentionMask("sdpa", everywhere)), want_all, rtol=1e-5, atol=1e-6
    )
    additive = torch.zeros(B, 1, T, T)
    torch.testing.assert_close(
        attend(q, k, v, attention.AttentionMask("sdpa", additive)), want_all, rtol=1e-5, atol=1e-6
    )
    assert not calls
    need = B * H * T * (T + attention.BLOCK_ROWS) // 2 * 4  # bytes of the probabilities kept
    monkeypatch.setattr(attention, "BLOCKED_MAX_BYTES", need)
    attend(q, k, v, mask)
    monkeypatch.setattr(attention, "BLOCKED_MAX_BYTES", need - 1)  # they no longer fit
    torch.testing.assert_close(attend(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def test_backend_resolution():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ConfigError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu")


@pytest.mark.parametrize("n_kv", [4, 2])
def test_xformers_gradients_equal_sdpa_without_the_forward_only_gqa_layout(n_kv, xformers_on_cpu, monkeypatch):
    """xformers' 5-D GQA layout has no backward: passes with gradients give it 4-D heads."""
    from xformers import ops

    reference, ndims = ops.memory_efficient_attention, []
    monkeypatch.setattr(
        ops, "memory_efficient_attention", lambda q, *a, **kw: ndims.append(q.ndim) or reference(q, *a, **kw)
    )
    g = torch.Generator().manual_seed(3)
    B, T, H, hd = DOCS.shape[0], DOCS.shape[1], 4, 8
    leaves = [torch.randn(B, T, h, hd, generator=g, requires_grad=True) for h in (H, n_kv, n_kv)]
    for doc_ids in (None, DOCS):
        grads = []
        for backend in ("xformers", "sdpa"):
            out = attend(*leaves, build_mask(backend, doc_ids, T))
            grads.append(torch.autograd.grad(out.square().sum(), leaves))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ndims == [4, 4]
    with torch.no_grad():
        attend(*leaves, build_mask("xformers", None, T))
    assert ndims[-1] == (5 if n_kv < H else 4)  # without gradients GQA keeps the grouped layout
    assert build_cache_mask("xformers", torch.tensor([3, 5]), T, 12).backend == "sdpa"  # gradients on


def test_xformers_counts_as_available_only_where_its_attention_runs(monkeypatch):
    """A build that imports but has no kernel for the device (here: CPU) is not available."""
    pytest.importorskip("xformers.ops")
    monkeypatch.setattr(attention, "_XFORMERS_PROBES", {})
    problem = attention.xformers_problem("cpu")
    assert problem.startswith("xformers is installed but its attention does not run on cpu: ")
    assert "\n" not in problem and not xformers_available("cpu")
    refusal = NotImplementedError(  # the shape of xformers' dispatcher message on a GPU it does not fit
        "No operator found for `memory_efficient_attention_forward` with inputs:\n     query : shape=(1, 16, 1, 64)\n"
        "`fa3F@0.0.0` is not supported because:\n    requires device with capability >= (9, 0)\n    dtype=x\n"
        "`cutlassF-pt` is not supported because:\n    operator wasn't built\n"
    )
    assert (
        attention._reason(refusal)
        == "fa3F@0.0.0: requires device with capability >= (9, 0); cutlassF-pt: operator wasn't built"
    )
    assert attention._reason(RuntimeError("CUDA error: no kernel image\nmore")) == "CUDA error: no kernel image"


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_xformers_masks_and_layouts_equal_sdpa(n_kv, xformers_on_cpu):
    """The xformers path around its kernel (xformers' reference attention on CPU): plain causal,
    packed documents as one flat row, and cache masks, with MHA, GQA and MQA."""
    g = torch.Generator().manual_seed(2)
    B, T, H, hd = DOCS.shape[0], DOCS.shape[1], 4, 8
    q = torch.randn(B, T, H, hd, generator=g)
    k, v = torch.randn(2, B, T, n_kv, hd, generator=g)
    for doc_ids in (None, DOCS):
        xf = build_mask("xformers", doc_ids, T)
        assert xf.flat == (doc_ids is not None)
        torch.testing.assert_close(
            attend(q, k, v, xf), attend(q, k, v, build_mask("sdpa", doc_ids, T)), rtol=1e-5, atol=1e-6
        )
    S = 16  # cache slots (+1 scratch slot)
    kc, vc = torch.randn(2, B, S + 1, n_kv, hd, generator=g)
    # ([13, 2], 4): row 0's padding reaches the scratch slot, the most the mask can hold; ([14, 2], 4):
    # past it, so that step attends with SDPA
    for lengths, n in (([3, 9], 4), ([0, 0], 5), ([7, 15], 1), ([13, 2], 4), ([14, 2], 4)):
        lengths = torch.tensor(lengths)
        with torch.no_grad():
            xf = build_cache_mask("xformers", lengths, n, S)
        assert xf.backend == ("xformers" if int(lengths.max()) + n <= S + 1 else "sdpa")
        want = attend(q[:, :n], kc, vc, build_cache_mask("sdpa", lengths, n, S))
        got = attend(q[:, :n], kc, vc, xf)
        room = (S - lengths).clamp(max=n)  # the queries a row may really hold; the others are padding
        for b in range(B):
            torch.testing.assert_close(
                got[b, : room[b]],
                want[b, : room[b]],
                rtol=1e-5,
                atol=1e-6,
                msg=f"lengths {lengths.tolist()}, {n} new, row {b}",
            )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
def test_xformers_equals_sdpa_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, hd = DOCS.shape[0], DOCS.shape[1], 4, 64
    q = torch.randn(B, T, H, hd, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, B, T, 2, hd, generator=g, device="cuda", dtype=torch.bfloat16)
    docs = DOCS.cuda()
    for doc_ids in (None, docs):
        want = attend(q, k, v, build_mask("sdpa", doc_ids, T))
        got = attend(q, k, v, build_mask("xformers", doc_ids, T))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    kc, vc = torch.randn(2, B, 17, 2, hd, generator=g, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([3, 9], device="cuda")
    want = attend(q[:, :2], kc, vc, build_cache_mask("sdpa", lengths, 2, 16))
    got = attend(q[:, :2], kc, vc, build_cache_mask("xformers", lengths, 2, 16))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_xformers_gradients_equal_sdpa_on_cuda(n_kv):
    """bf16 training passes (the kernels a GPU run uses: FA3 on Hopper), plain and packed, MHA/GQA/MQA."""
    g = torch.Generator(device="cuda").manual_seed(1)
    B, T, H, hd = DOCS.shape[0], DOCS.shape[1], 4, 64
    leaves = [
        torch.randn(B, T, h, hd, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (H, n_kv, n_kv)
    ]
    for doc_ids in (None, DOCS.cuda()):
        results = []
        for backend in ("xformers", "sdpa"):
            out = attend(*leaves, build_mask(backend, doc_ids, T))
            results.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
