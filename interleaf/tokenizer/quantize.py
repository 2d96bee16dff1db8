"""Vector quantizer of the VQ-GAN: nearest-code lookup with a straight-through gradient.

The parameter is `embedding` (an `nn.Embedding(n_embed, embed_dim)`), as in taming-transformers and
Chameleon, so published codebooks load by name. Options that keep a codebook alive:

- `l2_norm`: codes and latents are compared on the unit sphere (cosine distance), which with a
  low `embed_dim` (8-32) gives near-full usage (as in ViT-VQGAN / LlamaGen);
- `ema`: the codebook follows exponential moving averages of the latents assigned to each code
  instead of a gradient (buffers `cluster_size`, `embed_avg`);
- dead-code restart: assignments are counted (buffer `usage`) between calls of
  `restart_dead_codes`, which moves codes used fewer times than a threshold onto random latents of
  the current batch and starts a new counting window.

The extra buffers exist only when their option is on, so a plain quantizer has exactly the keys
of a taming / Chameleon checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizeOutput:
    """What one quantizer pass returns (losses are scalars; `codes` is (B, h, w))."""

    z_q: torch.Tensor  # (B, D, h, w), straight-through: gradient flows to the encoder
    codes: torch.Tensor  # (B, h, w) long
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2 (zero with EMA updates)
    commitment_loss: torch.Tensor  # ||z - sg(e)||^2 (unweighted; beta is applied by `loss`)
    loss: torch.Tensor  # codebook_loss + beta * commitment_loss
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # fraction of codes used in this batch
    latent: torch.Tensor  # (B, D, h, w) detached latent before rounding (l2-normalised if l2_norm)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup over channels of a (B, D, h, w) latent."""

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        l2_norm: bool = False,
        ema: bool = False,
        ema_decay: float = 0.99,
        restart_dead: bool = False,
    ):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.l2_norm, self.ema, self.ema_decay = l2_norm, ema, ema_decay
        self.restart_dead = restart_dead
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init
        if l2_norm:  # spread unit codes over the sphere instead of a tiny cube
            nn.init.normal_(self.embedding.weight)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.ones(n_embed))
            self.register_buffer("embed_avg", self.embedding.weight.detach().clone())
        if restart_dead:
            self.register_buffer("usage", torch.zeros(n_embed))  # assignments in this window

    def codebook(self) -> torch.Tensor:
        """The code vectors as compared with latents, (n_embed, D)."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_norm else w

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_flat (N, D) -> (N,)."""
        e = self.codebook()
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, written as in taming / Chameleon so codes match
        d = (
            torch.sum(z_flat**2, dim=1, keepdim=True)
            + torch.sum(e**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_flat, e.transpose(0, 1))
        )  # (N, n_embed)
        return torch.argmin(d, dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> code vectors (B, D, h, w)."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        z_q = F.embedding(codes, self.codebook())  # (B, h, w, D)
        return z_q.permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizeOutput:
        """Quantize z (B, D, h, w); in training mode also update EMA / usage statistics."""
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        z_flat = z.view(-1, D)  # (N, D)
        codes = self.nearest(z_flat.detach())  # (N,)
        counts = torch.bincount(codes, minlength=self.n_embed).to(z.dtype)  # (n_embed,)
        if self.training:
            self._update_stats(z_flat.detach(), codes, counts)
        e = self.codebook()
        z_q = F.embedding(codes, e).view(B, h, w, D)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2) if not self.ema else commitment.new_zeros(())
        z_q = z + (z_q - z).detach()  # straight-through estimator
        probs = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
        return QuantizeOutput(
            z_q=z_q.permute(0, 3, 1, 2).contiguous(),
            codes=codes.view(B, h, w),
            codebook_loss=codebook,
            commitment_loss=commitment,
            loss=codebook + self.beta * commitment,
            perplexity=perplexity.detach(),
            usage=(counts > 0).float().mean(),
            latent=z.detach().permute(0, 3, 1, 2),
        )

    @torch.no_grad()
    def _update_stats(self, z_flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA codebook step and usage tracking (training only)."""
        if self.restart_dead:
            self.usage.add_(counts)
        if self.ema:
            sums = torch.zeros_like(self.embed_avg).index_add_(0, codes, z_flat)  # (n_embed, D)
            self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.embed_avg.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            n = self.cluster_size.sum()
            # Laplace smoothing keeps empty clusters from dividing by zero
            size = (self.cluster_size + 1e-5) / (n + self.n_embed * 1e-5) * n
            self.embedding.weight.copy_(self.embed_avg / size.unsqueeze(1))

    @torch.no_grad()
    def restart_dead_codes(
        self, z: torch.Tensor, threshold: float = 0.05, generator: torch.Generator | None = None
    ) -> int:
        """Move codes used < threshold * (uniform share) times in this window onto latents of z; returns how many.

        z is (B, D, h, w) (e.g. `QuantizeOutput.latent`); the usage window restarts afterwards.
        """
        if not self.restart_dead:
            return 0
        total = float(self.usage.sum())
        dead = torch.nonzero(self.usage < threshold * total / self.n_embed).flatten()
        self.usage.zero_()
        if dead.numel() == 0 or total == 0:
            return 0
        z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)  # (N, D)
        if self.l2_norm:
            z_flat = F.normalize(z_flat, dim=1)
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), generator=generator)
        new = z_flat[pick]
        new = new + 1e-3 * torch.randn(new.shape, generator=generator).to(new)  # tie-breaking jitter
        self.embedding.weight[dead] = new
        if self.ema:
            self.embed_avg[dead] = new
            self.cluster_size[dead] = 1.0
        return int(dead.numel())
