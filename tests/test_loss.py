import math

import pytest
import torch

from interleaf.model.loss import IGNORE_INDEX, chunked_linear_cross_entropy, cross_entropy_loss


def hand_loss(logits, targets, weights, is_image, coef):
    """The loss written out token by token with math.log / math.exp."""
    num_ce = num_z = den = 0.0
    text, image = [], []
    for x, y, w, img in zip(logits.tolist(), targets.tolist(), weights.tolist(), is_image.tolist()):
        if y == IGNORE_INDEX:
            continue
        m = max(x)
        lse = m + math.log(sum(math.exp(v - m) for v in x))
        ce = lse - x[y]
        num_ce += w * ce
        num_z += w * lse * lse
        den += w
        (image if img else text).append(ce)
    return {
        "ce": num_ce / den,
        "z_loss": coef * num_z / den,
        "loss": num_ce / den + coef * num_z / den,
        "text_loss": sum(text) / len(text),
        "image_loss": sum(image) / len(image),
        "n_tokens": len(text) + len(image),
    }


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    N, D, V = 13, 6, 11
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 2  # large logits: z-loss matters
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = IGNORE_INDEX
    weights = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    is_image = torch.zeros(N, dtype=torch.bool)
    is_image[[0, 3, 4, 9]] = True
    return h, W, targets, weights, is_image


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_weighted_ce_and_z_loss_equal_hand_computation(batch, chunk):
    h, W, targets, weights, is_image = batch
    coef = 1e-2
    want = hand_loss(h @ W.T, targets, weights, is_image, coef)
    for out in (
        cross_entropy_loss(h @ W.T, targets, weights, is_image, z_coef=coef),
        chunked_linear_cross_entropy(h, W, targets, weights, is_image, z_coef=coef, chunk=chunk),
    ):
        for name in ("ce", "z_loss", "loss", "text_loss", "image_loss"):
            assert float(getattr(out, name)) == pytest.approx(want[name], rel=1e-10), name
        assert int(out.n_tokens) == want["n_tokens"]
        assert int(out.n_image_tokens) == 4 and int(out.n_text_tokens) == want["n_tokens"] - 4


def test_default_z_coefficient_and_unit_weights(batch):
    h, W, targets, _, is_image = batch
    out = cross_entropy_loss(h @ W.T, targets)
    want = hand_loss(h @ W.T, targets, torch.ones(len(targets)), is_image, 1e-5)
    assert float(out.z_loss) == pytest.approx(want["z_loss"], rel=1e-10)
    assert float(out.loss) == pytest.approx(want["loss"], rel=1e-10)


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_gradients_match_autograd_of_reference(batch, chunk):
    h, W, targets, weights, is_image = batch
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    h2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    (2.5 * chunked_linear_cross_entropy(h1, W1, targets, weights, z_coef=0.1, chunk=chunk).loss).backward()
    (2.5 * cross_entropy_loss(h2 @ W2.T, targets, weights, z_coef=0.1).loss).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-10, atol=1e-12)
    assert h1.grad[2].abs().max() == 0  # an ignored target gets no gradient


def test_gradcheck_float64(batch):
    h, W, targets, weights, _ = batch

    def f(a, b):
        return chunked_linear_cross_entropy(a, b, targets[:6], weights[:6], z_coef=0.05, chunk=4).loss

    assert torch.autograd.gradcheck(f, (h[:6].clone().requires_grad_(), W.clone().requires_grad_()))


def test_all_ignored_gives_zero_not_nan(batch):
    h, W, targets, _, _ = batch
    out = chunked_linear_cross_entropy(h.requires_grad_(), W, torch.full_like(targets, IGNORE_INDEX))
    assert float(out.loss.detach()) == 0.0 and int(out.n_tokens) == 0
    out.loss.backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() == 0


def test_no_grad_values_equal_grad_values(batch):
    h, W, targets, weights, is_image = batch
    a = chunked_linear_cross_entropy(h.requires_grad_(), W, targets, weights, is_image, chunk=4)
    with torch.no_grad():
        b = chunked_linear_cross_entropy(h, W, targets, weights, is_image, chunk=4)
    assert float(a.loss.detach()) == float(b.loss) and float(a.image_loss) == float(b.image_loss)


def test_bfloat16_inputs_use_float32_logits():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g)
    targets = torch.randint(0, 300, (40,), generator=g)
    ref = cross_entropy_loss(h.bfloat16().float() @ W.bfloat16().float().T, targets)
    out = chunked_linear_cross_entropy(h.bfloat16().requires_grad_(), W.bfloat16(), targets, chunk=16)
    assert out.loss.dtype == torch.float32
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss), rel=1e-2)
    out.loss.backward()


def test_batch_shapes_are_flattened():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    weights = torch.rand(2, 5, generator=g)
    a = cross_entropy_loss(logits, targets, weights)
    b = cross_entropy_loss(logits.reshape(10, 7), targets.reshape(10), weights.reshape(10))
    assert float(a.loss) == float(b.loss)
