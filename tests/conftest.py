import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: all per-op overhead, and threads only contend on a shared CPU.

    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """The xformers backend on CPU, its kernel replaced by xformers' own reference attention.

    xformers has no CPU kernels. `xformers.attn_bias_utils.ref_attention` is the function its
    test suite checks those kernels against, written in PyTorch; with it in place of
    `memory_efficient_attention`, everything interleaf does around the kernel runs for real:
    the (B, M, G, H, K) GQA layout, flattened rows, and the block-diagonal and padded-keys masks.
    The stand-in first makes the checks xformers makes before choosing a kernel (devices, dtypes,
    shapes, strides), and refuses what no kernel of its can differentiate: the 5-D layout and the
    padded-keys mask with gradients, which the reference itself would differentiate.
    """
    pytest.importorskip("xformers.ops")
    from xformers import attn_bias_utils, ops
    from xformers.ops.fmha import common, cutlass, flash

    from interleaf.model import transformer

    def reference(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
        assert p == 0.0 and not kwargs, "the reference has no dropout"
        common.Inputs(query, key, value, attn_bias, p, scale).validate_inputs()
        reasons = []
        for name, x in (("query", query), ("key", key), ("value", value)):
            common.check_lastdim_alignment_stride1(reasons, name, x, 8)
            flash._check_strides_for_bmghk(x, name, reasons)
        assert not reasons, reasons
        if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
            assert query.ndim == 4, "xformers has no backward for the 5-D GQA layout"
            supported = (*flash.BwOp.SUPPORTED_ATTN_BIAS_TYPES, *cutlass.BwOp.SUPPORTED_ATTN_BIAS_TYPES)
            assert type(attn_bias) in supported, f"no xformers backward for {type(attn_bias).__name__}"
        return attn_bias_utils.ref_attention(query, key, value, attn_bias, scale=scale).to(query.dtype)

    monkeypatch.setattr(ops, "memory_efficient_attention", reference)
    monkeypatch.setitem(transformer._BACKENDS, ("xformers", "cpu"), "xformers")
