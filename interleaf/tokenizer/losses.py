"""VQ-GAN training losses: reconstruction, VQ terms, PatchGAN hinge loss, optional LPIPS.

`VQGANLoss` follows taming-transformers' `VQLPIPSWithDiscriminator`: the generator loss is
reconstruction (+ perceptual) + codebook/commitment + an adaptively weighted adversarial term that
is switched on after `disc_start` steps; the discriminator is a PatchGAN (`NLayerDiscriminator`,
taming's module names) trained with the hinge loss. LPIPS runs only from weights the user gives
as local files; nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from interleaf.errors import ConfigError, InterleafError
from interleaf.tokenizer.vqgan import VQOutput


@dataclass
class LossConfig:
    """Weights and schedule of the VQ-GAN losses."""

    recon: Literal["l1", "l2"] = "l1"
    recon_weight: float = 1.0
    codebook_weight: float = 1.0  # on codebook + beta * commitment
    perceptual_weight: float = 0.0  # LPIPS; needs lpips_weights
    lpips_weights: str | None = None  # local file or folder (VGG16 features + LPIPS lin layers)
    disc_weight: float = 0.5  # adversarial weight (0 disables the discriminator)
    disc_start: int = 10_000  # step at which the adversarial terms switch on
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_layers: int = 3
    disc_channels: int = 64
    adaptive_weight: bool = True  # balance GAN vs reconstruction gradients at the last layer

    def validate(self) -> None:
        for name in ("recon_weight", "codebook_weight", "perceptual_weight", "disc_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise ConfigError(
                "loss.perceptual_weight > 0 needs loss.lpips_weights: a local file with VGG16 + LPIPS "
                "weights (nothing is downloaded)"
            )
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ConfigError("loss.disc_layers and loss.disc_channels must be >= 1")

    @property
    def use_disc(self) -> bool:
        return self.disc_weight > 0


# ----------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): (B, 3, H, W) -> patch logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
        layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad nll|| / ||grad g_loss|| at the decoder's last layer (taming), clamped to [0, 1e4]."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach()


# ----------------------------------------------------------------------------- LPIPS

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]  # relu1_2 ... relu5_3 of vgg16.features
_LPIPS_CHANNELS = [64, 128, 256, 512, 512]


class _NetLin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, 1, 0, bias=False))


class LPIPS(nn.Module):
    """LPIPS (VGG16) with taming / lpips module names (`net.slice{k}.{i}`, `lin{k}.model.1`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        features: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                features.append(nn.MaxPool2d(2, 2))
            else:
                features += [nn.Conv2d(c, v, 3, 1, 1), nn.ReLU(inplace=False)]
                c = v
        self.net = nn.Module()
        for k, (a, b) in enumerate(_SLICES, start=1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), features[i])
            setattr(self.net, f"slice{k}", s)
        for k, ch in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{k}", _NetLin(ch))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perceptual distance of images in [-1, 1], (B, 3, H, W) x2 -> (B,)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0.0
        for k in range(5):
            h = getattr(self.net, f"slice{k + 1}")(h)
            a, b = h.chunk(2)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean(dim=(1, 2, 3))
        return total

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: dropout stays off


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InterleafError(f"{path} does not hold a state dict")
    return state


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS from local weights: a file, or a folder of .pth/.pt/.safetensors files merged.

    Accepted keys: taming / lpips names (`net.slice{k}.{i}.*`, `lin{k}.model.1.weight`, with an
    optional `perceptual_loss.` / `loss.perceptual_loss.` prefix) and torchvision's VGG16
    (`features.{i}.*`, classifier keys ignored).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors"))
    elif path.is_file():
        files = [path]
    else:
        raise InterleafError(f"LPIPS weights not found: {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(_read_weights(f))
        except InterleafError:
            raise
        except Exception as e:
            raise InterleafError(f"cannot read LPIPS weights {f}: {e}") from None
    model = LPIPS()
    own = model.state_dict()
    mapped = {}
    for k, v in state.items():
        k = k.split("perceptual_loss.", 1)[-1]
        if k.startswith("features."):
            i = int(k.split(".")[1])
            slot = next((n for n, (a, b) in enumerate(_SLICES, start=1) if a <= i < b), None)
            k = f"net.slice{slot}.{k[len('features.') :]}" if slot else k
        if k in own:
            mapped[k] = v
    missing = [k for k in own if k not in mapped]
    if missing:
        raise InterleafError(f"LPIPS weights in {path} lack {len(missing)} tensors (e.g. {missing[0]})")
    model.load_state_dict(mapped)
    return model


# ----------------------------------------------------------------------------- the combined loss


class VQGANLoss(nn.Module):
    """Generator and discriminator objectives of VQ-GAN training; holds the discriminator."""

    def __init__(self, config: LossConfig, in_channels: int = 3):
        super().__init__()
        config.validate()
        self.config = config
        self.discriminator = (
            NLayerDiscriminator(in_channels, config.disc_channels, config.disc_layers) if config.use_disc else None
        )
        self.perceptual = load_lpips(config.lpips_weights) if config.perceptual_weight > 0 else None

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Pixel (+ perceptual) loss, mean over the batch."""
        diff = (recon - x).abs() if self.config.recon == "l1" else (recon - x) ** 2
        loss = self.config.recon_weight * diff.mean()
        if self.perceptual is not None:
            loss = loss + self.config.perceptual_weight * self.perceptual(x, recon).mean()
        return loss

    def generator_loss(
        self, x: torch.Tensor, out: VQOutput, step: int, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total autoencoder loss and the terms to log."""
        c = self.config
        nll = self.reconstruction(x, out.recon)
        loss = nll + c.codebook_weight * out.quant.loss
        logs = {
            "rec": float(nll.detach()),
            "codebook": float(out.quant.codebook_loss.detach()),
            "commit": float(out.quant.commitment_loss.detach()),
            "perplexity": float(out.quant.perplexity),
            "batch_usage": float(out.quant.usage),
        }
        if self.disc_active(step):
            g_loss = -self.discriminator(out.recon).mean()
            if c.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                w = adaptive_weight(nll, g_loss, last_layer)
            else:
                w = torch.tensor(1.0)
            loss = loss + c.disc_weight * w * g_loss
            logs.update(g_loss=float(g_loss.detach()), d_weight=float(w))
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge (or vanilla) loss on real images vs detached reconstructions."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(recon.detach())
        d = hinge_d_loss if self.config.disc_loss == "hinge" else vanilla_d_loss
        loss = d(logits_real, logits_fake)
        return loss, {
            "d_loss": float(loss.detach()),
            "logits_real": float(logits_real.detach().mean()),
            "logits_fake": float(logits_fake.detach().mean()),
        }
