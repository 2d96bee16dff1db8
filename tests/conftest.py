import pytest


@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """The xformers backend on CPU, its kernel replaced by xformers' own reference attention.

    xformers has no CPU kernels. `xformers.attn_bias_utils.ref_attention` is the function its
    test suite checks those kernels against, written in PyTorch; with it in place of
    `memory_efficient_attention`, everything interleaf does around the kernel runs for real:
    the (B, M, G, H, K) GQA layout, flattened rows, and the block-diagonal and padded-keys masks.
    """
    pytest.importorskip("xformers.ops")
    from xformers import attn_bias_utils, ops

    from interleaf.model import transformer

    def reference(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        assert p == 0.0 and not kwargs, "the reference has no dropout"
        return attn_bias_utils.ref_attention(query, key, value, attn_bias, scale=scale).to(query.dtype)

    monkeypatch.setattr(ops, "memory_efficient_attention", reference)
    monkeypatch.setitem(transformer._BACKENDS, ("xformers", "cpu"), "xformers")
