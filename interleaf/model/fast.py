"""Speed paths for the reference model of transformer.py, applied from outside.

transformer.py has one way through each op. The faster ways of computing the same thing live
here, and a model takes them by a call, as torchtitan applies compilation and checkpointing:

    apply_inference_fast_paths(model)   the sampler's model (pipeline.load_model): kept weight
                                        layouts for decoding on CPU, q/k/v and w1/w3 as one
                                        product each, QK-norm and RoPE of queries and keys at once,
                                        blocks that call their parts' forward functions
    apply_training_fast_paths(model)    a training pass off CPU (training/engine.py): q/k/v and
                                        w1/w3 as one product each over concatenated weights

Applying one changes the classes of modules (to subclasses of the reference ones, as FSDP2's
`fully_shard` does), never their parameters: the state dict keeps its names and tensors. Each
path computes what the reference computes (tests/test_model_fast.py compares them at several
shapes) and runs the reference forward wherever it would not: an inference path while autograd
records or a compiler traces, a training path below FUSE_MIN_TOKENS tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from interleaf.model.attention import attend
from interleaf.model.ops import apply_rope, rms_norm, swiglu
from interleaf.model.transformer import (
    Attention,
    FeedForward,
    HeadLayerNorm,
    OutputHead,
    RMSNorm,
    Transformer,
    TransformerBlock,
    head_layer_norm,
)

# In a training model's passes (apply_training_fast_paths; its held-out evaluation too), from this
# many tokens per call, q/k/v (and w1/w3) run as one matmul over weights concatenated in each pass.
# Not on CPU (the engine does not apply them there): the separate products make a training step
# 1.5-2.7% faster (bench/RESULTS.md, "Training step"): the concatenation, its gradient's split and
# the strided q/k/v slices cost more than the one larger matmul saves.
FUSE_MIN_TOKENS = 64
# Without autograd, concatenated weights up to this size are kept between calls (so decoding
# steps run one matmul for q/k/v and one for w1/w3); larger ones are not worth the memory.
FUSED_CACHE_MAX_BYTES = 32 * 2**20
# Decoding on CPU, F.linear of a few rows reads its weight at a third to a half of the memory
# bandwidth: MKL runs it on one thread, and reads an (out, in) weight with more outputs than
# inputs slowly. So with several threads, products of up to SPLIT_MAX_ROWS rows run as one batched
# matmul over slices of the inputs, one slice per thread, summed; with one thread, products of up
# to MATVEC_MAX_ROWS rows by a weight with more outputs than inputs read it stored transposed,
# (in, out). Such weights are kept a second time, transposed. A decode step's products run about
# 2x faster with 2 threads, 1.4x with one (bench/RESULTS.md, "Decoding"); F.linear is as fast
# at 32 rows, and from 4 rows with one thread. float32 only: CPU bmm in half precision is slow.
SPLIT_MAX_ROWS = 16
MATVEC_MAX_ROWS = 3


class FusedWeight:
    """The concatenation of some parameters along dim 0, kept for inference until one changes.

    A parameter changes by an in-place op (its version counter moves) or by new data (its pointer
    moves); the old tensors are held so that new data cannot reuse their address unnoticed.
    Writes through `p.data` move neither: after such a write, run the next pass with autograd on
    or reload the model. `linear` also keeps the transposed layout, (in, out), once a product on
    CPU wants it. Parameters a wrapper manages (ZeRO-3 partitions: `ds_id`) are never kept.
    """

    def __init__(self):
        self.key, self.value, self.value_t, self.sources = None, None, None, ()
        self.split = None  # value_t viewed as (ways, in / ways, out)

    def __call__(self, *params: torch.Tensor) -> torch.Tensor | None:
        """The concatenated weight; None when it would be larger than FUSED_CACHE_MAX_BYTES, or a
        parameter is not a whole 2-D tensor of its own."""
        key = [(p.data_ptr(), p._version) for p in params]
        if key != self.key:
            if sum(p.numel() * p.element_size() for p in params) > FUSED_CACHE_MAX_BYTES:
                return None
            if any(p.dim() != 2 or not p.numel() or hasattr(p, "ds_id") for p in params):
                return None
            self.sources = tuple(p.detach() for p in params)
            self.value = self.sources[0] if len(params) == 1 else torch.cat(self.sources)
            self.value_t, self.split, self.key = None, None, key
        return self.value

    def linear(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor | None:
        """F.linear(x, cat(params)) from the kept weight (None when it is too large to keep)."""
        w = self(*params)
        if w is None:
            return None
        rows, (n_out, n_in), k = x.numel() // x.shape[-1], w.shape, torch.get_num_threads()
        split = rows <= SPLIT_MAX_ROWS if k > 1 else rows <= MATVEC_MAX_ROWS and n_out > n_in
        if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or not split or n_in % k:
            return F.linear(x, w)
        if self.split is None or self.split.shape[0] != k:
            if self.value_t is None:
                self.value_t = w.t().contiguous()
            self.split = self.value_t.view(k, n_in // k, n_out)
        xs = x.reshape(k, 1, n_in // k) if rows == 1 else x.reshape(rows, k, n_in // k).transpose(0, 1)
        y = torch.bmm(xs, self.split)  # (k, rows, out)
        return (y[0] if k == 1 else y.sum(0)).view(*x.shape[:-1], n_out)

    def apply(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """linear(x), through the kept weight when that computes the same: a plain nn.Linear
        without bias or hooks (a wrapped, quantised or hooked module runs its own forward)."""
        y = (
            self.linear(x, linear.weight)
            if _plain_linear(linear) and not (linear._forward_hooks or linear._forward_pre_hooks)
            else None
        )
        return linear(x) if y is None else y


def inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Inference paths apply: autograd records nothing here and no compiler is tracing."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in module.parameters())


# ---- inference ---------------------------------------------------------------------------------
class InferenceHead(OutputHead):
    """The output head; logits of an inference pass through the kept weight."""

    def forward(self, h, targets=None, weights=None, is_image=None, z_coef: float = 0.0, chunk: int = 1024):
        if targets is None and inference(self, h):
            logits = self._kept.linear(h, self.weight)
            if logits is not None:
                return logits
        return super().forward(h, targets, weights, is_image, z_coef, chunk)


class InferenceAttention(Attention):
    """Inference: one product for q/k/v through the kept [wq; wk; wv], QK-norm and RoPE of queries
    and keys together, wo through its kept weight."""

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        if not inference(self, x):
            return super().forward(x, cos, sin, mask, cache, slots)
        B, T, _ = x.shape
        q, k, v = self._project_kept(x, cos, sin)
        if cache is not None:  # as the reference does
            k, v = cache.update(self.layer_id, slots, k, v)
            k, v = k[:, : mask.n_keys], v[:, : mask.n_keys]
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, T, H, hd)
        return self._wo.apply(out.reshape(B, T, -1), self.wo)

    def _project_kept(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None):
        """`project`, without autograd, from one product through the kept [wq; wk; wv]."""
        qkv = self._wqkv.linear(x, self.wq.weight, self.wk.weight, self.wv.weight)  # (B, T, (H + 2 Hkv) hd)
        if qkv is None:  # too large to keep
            return super().project(x, cos, sin)
        H, Hkv = self.n_heads, self.n_kv_heads
        heads = qkv.unflatten(-1, (H + 2 * Hkv, self.head_dim))  # (B, T, H + 2 Hkv, hd)
        qk, v = heads[:, :, : H + Hkv], heads[:, :, H + Hkv :]  # (B, T, H + Hkv, hd), (B, T, Hkv, hd)
        qk = apply_rope(self._qk_norm(qk), cos, sin)
        return qk[:, :, :H], qk[:, :, H:], v

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm of the first H heads of qk (B, T, H + Hkv, hd) and k_norm of the others, as one op."""
        qn, kn = self.q_norm, self.k_norm
        if isinstance(qn, HeadLayerNorm):
            weight = self._qk_weight(qn.weight, kn.weight)  # (H + Hkv, hd)
            return head_layer_norm(qk, weight, self._qk_bias(qn.bias, kn.bias), qn.eps)
        if isinstance(qn, RMSNorm):
            H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
            weight = self._qk_weight(qn.weight.expand(H, hd), kn.weight.expand(Hkv, hd))  # (H + Hkv, hd)
            return rms_norm(qk, weight, qn.eps)
        return qk


class InferenceFeedForward(FeedForward):
    """Inference: one product for w1/w3 through the kept [w1; w3], silu(a) * b without autograd,
    w2 through its kept weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._w13.linear(x, self.w1.weight, self.w3.weight) if inference(self, x) else None
        return super().forward(x) if h is None else self._w2.apply(swiglu(h), self.w2)


class InferenceBlock(TransformerBlock):
    """Inference without hooks: the same residual branches, calling the parts' forward functions
    (a module call costs more than some of the ops of a decode step)."""

    def forward(self, x, cos, sin, mask, cache=None, slots=None):
        if not (inference(self, x) and self._unhooked()):
            return super().forward(x, cos, sin, mask, cache, slots)
        attn, ffn = self.attention.forward, self.feed_forward.forward
        n1, n2, drop = self.attention_norm.forward, self.ffn_norm.forward, self.drop.forward
        if self.swin:
            h = x + drop(n1(attn(x, cos, sin, mask, cache, slots)))
            return h + drop(n2(ffn(h)))
        h = x + drop(attn(n1(x), cos, sin, mask, cache, slots))
        return h + drop(ffn(n2(h)))

    def _unhooked(self) -> bool:
        """No forward hooks on the parts, their own or global ones: calling their forward is the same."""
        hooks = torch.nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.children())


def _become(module: nn.Module, reference: type, fast: type, *kept: str) -> None:
    """Give a module of exactly the reference class the fast subclass, and an empty FusedWeight per
    name in `kept` (a wrapped, quantised or otherwise replaced module keeps its own forward)."""
    if type(module) is reference:
        module.__class__ = fast
        for name in kept:
            setattr(module, name, FusedWeight())


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None


def apply_inference_fast_paths(model: Transformer) -> Transformer:
    """Give `model` the inference paths of this module, in place (state dict unchanged); returns it."""
    for layer in model.layers:
        _become(layer, TransformerBlock, InferenceBlock)
        attention, ffn = layer.attention, layer.feed_forward
        if all(_plain_linear(m) for m in (attention.wq, attention.wk, attention.wv)):
            _become(attention, Attention, InferenceAttention, "_wqkv", "_qk_weight", "_qk_bias", "_wo")
        if _plain_linear(ffn.w1) and _plain_linear(ffn.w3):
            _become(ffn, FeedForward, InferenceFeedForward, "_w13", "_w2")
    _become(model.output, OutputHead, InferenceHead, "_kept")
    return model


# ---- training ----------------------------------------------------------------------------------
class ConcatAttention(Attention):
    """q/k/v as one product over [wq; wk; wv], concatenated in each pass (its gradient splits)."""

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None):
        B, T, _ = x.shape
        if B * T < FUSE_MIN_TOKENS:
            return super().project(x, cos, sin)
        w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        q, k, v = F.linear(x, w).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], -1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin), v


class ConcatFeedForward(FeedForward):
    """w1/w3 as one product over [w1; w3]; SwiGLU's gradient written in place (ops.swiglu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] < FUSE_MIN_TOKENS:
            return super().forward(x)
        return self.w2(swiglu(F.linear(x, torch.cat([self.w1.weight, self.w3.weight]))))


def apply_training_fast_paths(model: Transformer) -> Transformer:
    """Give `model` the training paths of this module, in place (state dict unchanged); returns it.

    For accelerators: on CPU the separate products are faster (see FUSE_MIN_TOKENS).
    """
    for layer in model.layers:
        _become(layer.attention, Attention, ConcatAttention)
        _become(layer.feed_forward, FeedForward, ConcatFeedForward)
    return model
