"""Elementwise pieces of the transformer with hand-written backward passes.

Eager PyTorch runs one kernel per elementwise op; on CPU (and for small GPU batches) the passes
over activations, not the matmuls, decide how close a training step gets to the matmul peak.
These functions compute the textbook formulas in fewer passes: RMSNorm in 3 passes forward and
~6 backward (autograd of the composite: 6 and ~12), SwiGLU from one fused [w1; w3] projection
writing its gradient in place, RoPE as one complex multiply each way. Each has a plain reference
(`*_reference`) that the tests compare against, values and gradients.

Without autograd (inference under `torch.no_grad`, or no input requiring grad) the same formulas
run as plain tensor ops: no graph, no saved tensors, fewer kernels per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _up(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; wider dtypes unchanged."""
    return x.float() if x.dtype in _HALF else x


# ---- RMSNorm ----------------------------------------------------------------------------------
def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the reciprocal rms r (..., 1): the autograd path's forward (and half precision's without it)."""
    xf = _up(x)
    ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])  # (..., 1)
    r = ms.add_(eps).rsqrt_()
    return (xf * r).mul_(weight).to(x.dtype), r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, r = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        gf = _up(g)
        xn = _up(x) * r  # normalised input
        gw = gf * weight
        dot = (gw * xn).sum(-1, keepdim=True).div_(x.shape[-1])  # (..., 1)
        gx = torch.addcmul(gw, xn, dot, value=-1).mul_(r)
        gweight = None
        if ctx.needs_input_grad[1]:
            gweight = (gf * xn).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return gx.to(x.dtype), gweight, None


def needs_graph(*tensors: torch.Tensor) -> bool:
    """True when autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (statistics in float32 or wider)."""
    if needs_graph(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    if weight.dim() == 1 and x.dtype == weight.dtype and x.dtype not in _HALF:  # one fused kernel (equal to ~1e-6)
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return _rms_norm_forward(x, weight, eps)[0]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _up(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


# ---- SwiGLU -----------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        a, b = h.chunk(2, dim=-1)
        sa = F.silu(a)
        ctx.save_for_backward(h, sa)
        return sa * b

    @staticmethod
    def backward(ctx, g):
        h, sa = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        da, db = dh.chunk(2, dim=-1)  # views: the gradient is written in place, no concatenation
        torch.mul(g, sa, out=db)
        torch.ops.aten.silu_backward.grad_input(g * b, a, grad_input=da)
        return dh


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h = [a | b] (..., 2F) -> silu(a) * b (..., F)."""
    if needs_graph(h):
        return _SwiGLU.apply(h)
    a, b = h.chunk(2, dim=-1)
    return F.silu(a).mul_(b)


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b


# ---- RoPE -------------------------------------------------------------------------------------
def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) positions -> cos, sin of shape (B, T, 1, head_dim / 2), float32."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = positions[..., None].float() * (1.0 / theta**exponent)  # (B, T, hd/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


class RopeTable:
    """The rotation cos + i sin of every position below a length, computed once, gathered by position."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.table = None

    def __call__(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """(B, T) positions, all < length -> complex (B, T, 1, head_dim / 2), from `rope_angles`."""
        t = self.table
        if t is None or t.shape[0] < length or t.device != positions.device:
            grid = torch.arange(length, device=positions.device)[None]  # (1, L)
            self.table = t = torch.complex(*rope_angles(grid, self.head_dim, self.theta))[0]  # (L, 1, hd/2)
        return t[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor | None) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, hd) by the angles (B, T, 1, hd/2).

    With `sin` None, `cos` is the complex rotation cos + i sin itself (as `RopeTable` gives).
    """
    if torch.compiler.is_compiling() or x.stride(-1) != 1:
        if sin is None:
            cos, sin = cos.real, cos.imag
        return apply_rope_reference(x, cos, sin)
    xc = torch.view_as_complex(_up(x).unflatten(-1, (-1, 2)))  # (B, T, H, hd/2) complex
    out = torch.view_as_real(xc * (torch.complex(cos, sin) if sin is not None else cos)).flatten(-2)
    return out.to(x.dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Real-arithmetic RoPE (the form compilers fuse well)."""
    pairs = _up(x).unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
