"""Training loss: weighted cross-entropy + z-loss, computed chunk by chunk through the output head.

For token i with logits x_i, target y_i, weight w_i (0 where y_i == IGNORE_INDEX) and
log-normaliser lse_i = logsumexp(x_i):

    ce     = sum_i w_i (lse_i - x_i[y_i]) / sum_i w_i
    z_loss = coef * sum_i w_i lse_i^2 / sum_i w_i
    loss   = ce + z_loss

text_loss / image_loss are the unweighted mean CE over valid text / image targets (for logging).
`chunked_linear_cross_entropy` never holds more than `chunk` rows of float32 logits: the forward
pass computes each chunk's loss and its gradients at once (as fused linear-CE kernels do) and
the backward pass only scales them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    """The loss to backpropagate and its parts (detached, for logging; counts as tensors, no sync).

    A NamedTuple, not a dataclass: wrappers that hook the tensors a module returns (ZeRO-3 re-gathers
    the output head's weight for backward that way) look inside tuples, and rebuild named ones.
    """

    loss: torch.Tensor  # scalar: ce + z_loss
    ce: torch.Tensor
    z_loss: torch.Tensor
    text_loss: torch.Tensor  # 0 when there is no text target (see n_text_tokens)
    image_loss: torch.Tensor  # 0 when there is no image target (see n_image_tokens)
    n_tokens: torch.Tensor  # valid targets
    n_text_tokens: torch.Tensor
    n_image_tokens: torch.Tensor


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precisions to float32; keep float32/float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_weights(targets: torch.Tensor, weights: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    """(N,) weights normalised to sum 1 over valid targets (all zero when nothing is valid)."""
    valid = targets != IGNORE_INDEX
    w = valid.to(dtype) if weights is None else weights.to(dtype) * valid
    total = w.sum()
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _summarise(loss, ce_tok, lse_tok, w, targets, is_image, z_coef) -> LossOutput:
    """Assemble a LossOutput from per-token CE and log-normalisers."""
    valid = targets != IGNORE_INDEX
    image = valid & is_image if is_image is not None else torch.zeros_like(valid)
    text = valid & ~image
    ce_tok = ce_tok.detach()

    def mean_over(mask):
        n = mask.sum()
        return (ce_tok * mask).sum() / n.clamp(min=1), n

    text_loss, n_text = mean_over(text)
    image_loss, n_image = mean_over(image)
    return LossOutput(
        loss=loss,
        ce=(w * ce_tok).sum(),
        z_loss=z_coef * (w * lse_tok.detach() ** 2).sum(),
        text_loss=text_loss,
        image_loss=image_loss,
        n_tokens=valid.sum(),
        n_text_tokens=n_text,
        n_image_tokens=n_image,
    )


def _flat(targets, weights, is_image):
    return (
        targets.reshape(-1),
        None if weights is None else weights.reshape(-1),
        None if is_image is None else is_image.reshape(-1).bool(),
    )


def cross_entropy_loss(logits, targets, weights=None, is_image=None, z_coef: float = 1e-5) -> LossOutput:
    """Reference loss from full logits (..., V) (materialises them; for tests and small models)."""
    targets, weights, is_image = _flat(targets, weights, is_image)
    logits = _float(logits.reshape(-1, logits.shape[-1]))  # (N, V)
    w = token_weights(targets, weights, logits.dtype)
    lse = logits.logsumexp(-1)  # (N,)
    ce_tok = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    loss = (w * (ce_tok + z_coef * lse**2)).sum()
    return _summarise(loss, ce_tok, lse, w, targets, is_image, z_coef)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i (CE_i + coef lse_i^2) of logits = h @ weight.T, chunk by chunk, gradients in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, z_coef: float, chunk: int, need_grad: bool):
        # h (N, D), weight (V, D), targets (N,), w (N,) normalised token weights
        N = h.shape[0]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros_like(weight, dtype=_float(weight).dtype) if need_grad else None
        ce = h.new_empty(N, dtype=_float(h).dtype)
        lse = torch.empty_like(ce)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            hc = h[s:e]  # (n, D)
            logits = _float(hc @ weight.t())  # (n, V)
            tgt = targets[s:e].clamp(min=0)[:, None]  # (n, 1); ignored rows have w == 0
            lse_c = torch.logsumexp(logits, -1)  # (n,)
            ce[s:e] = lse_c - logits.gather(1, tgt).squeeze(1)
            lse[s:e] = lse_c
            if need_grad:
                wc = w[s:e].to(logits.dtype)
                # d/dlogits of w (lse - x_y + coef lse^2) = w (1 + 2 coef lse) softmax - w onehot
                grad = logits.sub_(lse_c[:, None]).exp_().mul_((wc * (1 + 2 * z_coef * lse_c))[:, None])
                grad.scatter_add_(1, tgt, -wc[:, None])
                grad = grad.to(h.dtype)
                torch.mm(grad, weight, out=grad_h[s:e])
                if grad.dtype == grad_w.dtype:
                    grad_w.addmm_(grad.t(), hc)
                else:  # half-precision matmul, float32 accumulation across chunks
                    grad_w += (grad.t() @ hc).to(grad_w.dtype)
        loss = (w.to(ce.dtype) * (ce + z_coef * lse**2)).sum()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, lse)
        return loss, ce, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_lse):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(
    h, weight, targets, weights=None, is_image=None, z_coef: float = 1e-5, chunk: int = 1024
) -> LossOutput:
    """Loss of logits = h @ weight.T without materialising them: h (..., D), weight (V, D)."""
    targets, weights, is_image = _flat(targets, weights, is_image)
    h = h.reshape(-1, h.shape[-1])  # (N, D)
    w = token_weights(targets, weights, _float(h).dtype)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss, ce_tok, lse = _LinearCrossEntropy.apply(h, weight, targets, w, float(z_coef), int(chunk), need_grad)
    return _summarise(loss, ce_tok, lse, w, targets, is_image, z_coef)
