"""VQ-GAN image tokenizer: convolutional encoder, vector quantizer, convolutional decoder.

Module names follow taming-transformers' `VQModel` (the family Chameleon's image tokenizer
belongs to): `encoder.conv_in`, `encoder.down.{i}.block.{j}`, `encoder.down.{i}.downsample.conv`,
`encoder.mid.{block_1,attn_1,block_2}`, `encoder.norm_out`, `encoder.conv_out`, `quant_conv`,
`quantize.embedding`, `post_quant_conv`, `decoder.conv_in`, `decoder.mid...`,
`decoder.up.{i}.block.{j}`, `decoder.up.{i}.upsample.conv`, `decoder.norm_out`,
`decoder.conv_out`. Published weights therefore load with `load_state_dict`: taming's (and Meta's
Chameleon release's) Lightning checkpoint and `vqgan.yaml` through `convert_hf_vq_state_dict` and
`vq_config_from_taming`, Hugging Face's `ChameleonVQVAE` (encoder + quantizer; community
conversions add the decoder) through `convert_hf_vq_state_dict` and `vq_config_from_hf`.

The VQ-GAN always runs in float32, whatever dtype its weights are stored in: a code is an argmin
over distances, and bfloat16 latents pick other codes (Meta's release runs it in float32 too).

The arithmetic matches taming / Chameleon exactly (GroupNorm eps 1e-6, swish as x*sigmoid(x),
asymmetric (0,1,0,1) padding before the stride-2 conv, single-head attention over pixels,
argmin over squared distances), so the same weights give the same codes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from interleaf.config import from_dict, read_yaml, save_config
from interleaf.errors import ConfigError, InterleafError
from interleaf.pipeline import read_weights
from interleaf.tokenizer.quantize import QuantizeOutput, VectorQuantizer
from interleaf.utils import atomic_path

WEIGHTS_FILE = "vqgan.safetensors"
CONFIG_FILE = "vqgan.yaml"


@dataclass
class VQConfig:
    """Shape of a VQ-GAN; the defaults are Chameleon's tokenizer (512px -> 32x32 codes of 8192)."""

    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)  # feature-map sizes with attention
    mid_attn: bool = True  # attention block in the middle of encoder and decoder
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32  # GroupNorm groups (32 in taming; lower for tiny channel counts)
    n_embed: int = 8192  # codebook size
    embed_dim: int = 256  # code dimension
    beta: float = 0.25  # commitment weight
    l2_norm: bool = False  # compare l2-normalised codes and latents (cosine)
    ema: bool = False  # codebook follows EMA of assigned latents instead of gradients
    ema_decay: float = 0.99
    restart_dead: bool = False  # move rarely used codes onto live latents during training
    has_decoder: bool = True  # False for encoder-only weights (Hugging Face Chameleon)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.resolution // self.downsample,) * 2

    def validate(self) -> None:
        """Raise ConfigError on shapes the network cannot be built with."""
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"model.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if self.resolution <= 0 or self.resolution % self.downsample:
            raise ConfigError(
                f"model.resolution {self.resolution} must be a positive multiple of the downsampling "
                f"factor {self.downsample} (2 ** (len(ch_mult) - 1))"
            )
        for name in ("ch", "z_channels", "n_embed", "embed_dim", "num_res_blocks", "norm_groups"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        widths = {self.ch * m for m in self.ch_mult} | {self.ch}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ConfigError(f"model channel widths {bad} are not divisible by model.norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


# ----------------------------------------------------------------------------- building blocks


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a (1x1 conv) shortcut; taming's block without time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1 convs for q/k/v/proj_out."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)  # (B, C, HW)
        w = torch.bmm(q, k) * (int(C) ** (-0.5))  # (B, HW_q, HW_k); same op order as taming
        w = F.softmax(w, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right and bottom)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image (B, C, R, R) -> latent (B, z_channels, R/f, R/f)."""

    def __init__(self, c: VQConfig):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(c.ch_mult), c.num_res_blocks
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        in_mult = (1,) + tuple(c.ch_mult)
        res = c.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = c.ch * in_mult[i], c.ch * mult
            for _ in range(c.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, c.dropout, g))
                block_in = block_out
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(block_in, g))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, c.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g) if c.mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, c.dropout, g)
        self.norm_out = norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, down in enumerate(self.down):
            for j, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[j](h)
            if i != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, R/f, R/f) -> image (B, out_ch, R, R), unbounded."""

    def __init__(self, c: VQConfig):
        super().__init__()
        self.num_resolutions = len(c.ch_mult)
        g = c.norm_groups
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // c.downsample
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, c.dropout, g)
        self.mid.attn_1 = AttnBlock(block_in, g) if c.mid_attn else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, c.dropout, g)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = c.ch * c.ch_mult[i]
            for _ in range(c.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, c.dropout, g))
                block_in = block_out
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(block_in, g))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)  # keep taming's indexing: up[0] is the full-resolution level
        self.norm_out = norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_resolutions)):
            up = self.up[i]
            for j, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[j](h)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------- the model


@dataclass
class VQOutput:
    """A training forward pass: reconstruction plus the quantizer's output."""

    recon: torch.Tensor  # (B, 3, R, R), not clamped
    quant: QuantizeOutput


class VQModel(nn.Module):
    """VQ-GAN tokenizer: `encode` images to code grids, `decode_code` grids back to images."""

    def __init__(self, config: VQConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = VectorQuantizer(
            config.n_embed,
            config.embed_dim,
            beta=config.beta,
            l2_norm=config.l2_norm,
            ema=config.ema,
            ema_decay=config.ema_decay,
            restart_dead=config.restart_dead,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config) if config.has_decoder else None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the code grid for one image."""
        return self.config.grid

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def _check_images(self, x: torch.Tensor) -> None:
        R, C = self.config.resolution, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != R or x.shape[3] != R:
            raise InterleafError(f"VQ-GAN expects images of shape (B, {C}, {R}, {R}), got {tuple(x.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        h, w = self.grid
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (h, w):
            raise InterleafError(f"VQ-GAN expects codes of shape (B, {h}, {w}), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            raise InterleafError(
                f"image codes must lie in [0, {self.config.n_embed}), got {int(codes.min())}..{int(codes.max())}"
            )

    def _decoder(self) -> Decoder:
        if self.decoder is None:
            raise InterleafError(
                "this VQ-GAN has no decoder weights (encoder-only, e.g. converted from Hugging Face "
                "Chameleon); it can encode images but not decode codes"
            )
        return self.decoder

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> pre-quantization latent (B, embed_dim, h, w)."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] -> codes (B, h, w) long (no gradient: codes are discrete)."""
        z = self.latent(x.to(self.device, self.quant_conv.weight.dtype))
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        if self.config.l2_norm:
            flat = F.normalize(flat, dim=1)
        return self.quantize.nearest(flat).view(B, h, w)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latent (B, embed_dim, h, w) -> images (B, 3, R, R), not clamped."""
        return self._decoder()(self.post_quant_conv(z_q))

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, R, R) clamped to [-1, 1]."""
        codes = torch.as_tensor(codes, device=self.device)
        self._decoder()
        self._check_codes(codes)
        return self.decode(self.quantize.lookup(codes.long())).clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Training pass: encode, quantize (straight-through), decode."""
        quant = self.quantize(self.latent(x))
        return VQOutput(recon=self.decode(quant.z_q), quant=quant)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> None:
        """Write `vqgan.safetensors` and `vqgan.yaml` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        save_config(self.config, directory / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQModel:
        """Load a directory written by `save` (decoder optional, per `has_decoder` in vqgan.yaml), in
        float32 whatever the stored dtype."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InterleafError(f"VQ-GAN directory not found: {directory}")
        cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise InterleafError(f"VQ-GAN directory {directory} has no {p.name}")
        config = from_dict(VQConfig, read_yaml(cfg_path), prefix="model")
        model = cls(config)
        model.load_weights(read_weights(weights_path), source=str(weights_path))  # copied into the float32 parameters
        return model.eval().to(device)

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """`load_state_dict(strict=True)` with one clear InterleafError on missing/unexpected/mis-shaped keys."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            if shapes:
                k = shapes[0]
                parts.append(
                    f"{len(shapes)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
                )
            raise InterleafError(f"VQ-GAN weights in {source} do not match its config: " + "; ".join(parts))
        self.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- interop

_VQ_TOP = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def convert_hf_vq_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Hugging Face Chameleon / taming checkpoint -> VQModel state dict (taming names).

    Accepts a `ChameleonVQVAE` state dict (already taming names), a full Chameleon model's
    (`model.vqmodel.*` / `vqmodel.*` prefixes) or a taming Lightning checkpoint (`{"state_dict":
    ...}` with `loss.*` discriminator/LPIPS keys, dropped). Keys outside the VQ model are dropped.
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "vqmodel." in key:
            key = key.split("vqmodel.", 1)[1]
        if key.startswith(_VQ_TOP):
            out[key] = value
    return out


def vq_config_from_hf(hf_config: Any, has_decoder: bool = False) -> VQConfig:
    """`ChameleonVQVAEConfig` (object or dict) -> VQConfig; `has_decoder`: the checkpoint holds decoder
    weights (transformers' own format has none; community conversions of Anole keep them)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    if get("double_latent", False):
        raise InterleafError("Chameleon VQ configs with double_latent=true are not supported")
    return VQConfig(
        resolution=int(get("resolution", 512)),
        in_channels=int(get("in_channels", 3)),
        out_ch=int(get("out_channels", 3)),
        ch=int(get("base_channels", 128)),
        ch_mult=[int(m) for m in get("channel_multiplier", [1, 1, 2, 2, 4])],
        num_res_blocks=int(get("num_res_blocks", 2)),
        attn_resolutions=[int(r) for r in (get("attn_resolutions", None) or [])],
        mid_attn=get("attn_type", "vanilla") == "vanilla",
        z_channels=int(get("latent_channels", 256)),
        dropout=float(get("dropout", 0.0)),
        n_embed=int(get("num_embeddings", 8192)),
        embed_dim=int(get("embed_dim", 256)),
        has_decoder=has_decoder,
    )


# taming's VQModel arguments that do not shape the network (training, logging, file paths)
TAMING_IGNORED = {
    "ckpt_path",
    "ignore_keys",
    "image_key",
    "colorize_nlabels",
    "monitor",
    "scheduler_config",
    "lr_g_factor",
    "sane_index_shape",
    "lossconfig",
}
# ddconfig values taming accepts whose other settings this VQ-GAN does not build
TAMING_FIXED = {
    "double_z": False,
    "resamp_with_conv": True,
    "give_pre_end": False,
    "tanh_out": False,
    "use_linear_attn": False,
}


def vq_config_from_taming(params: Any, source: str = "vqgan.yaml") -> VQConfig:
    """taming's `model.params` (`embed_dim`, `n_embed`, `ddconfig`, as in Chameleon's vqgan.yaml) ->
    VQConfig with a decoder; a setting this VQ-GAN cannot build is an InterleafError naming it."""
    if not isinstance(params, Mapping) or not isinstance(params.get("ddconfig"), Mapping):
        raise InterleafError(f"{source}: model.params.ddconfig is missing: not a taming VQ-GAN config")
    if params.get("remap") is not None:
        raise InterleafError(f"{source}: model.params.remap (a remapped codebook) is not supported")
    top = {k: v for k, v in params.items() if k not in TAMING_IGNORED and k not in ("ddconfig", "remap")}
    dd = dict(params["ddconfig"])
    for key, value in TAMING_FIXED.items():
        if key in dd and dd.pop(key) != value:
            raise InterleafError(f"{source}: ddconfig.{key} other than {value} is not supported")
    attn = dd.pop("attn_type", "vanilla")
    if attn not in ("vanilla", "none") or (attn == "none" and dd.get("attn_resolutions")):
        raise InterleafError(f"{source}: ddconfig.attn_type {attn!r} is not supported (only vanilla attention)")
    try:
        return from_dict(VQConfig, {**dd, **top, "mid_attn": attn == "vanilla"}, prefix="model.params")
    except ConfigError as e:
        raise InterleafError(f"{source}: {e}") from None


def vq_config_to_hf(config: VQConfig) -> dict:
    """VQConfig -> keyword arguments of transformers' `ChameleonVQVAEConfig`."""
    if config.l2_norm:
        raise InterleafError("Chameleon's VQ-GAN has no l2-normalised codes; this VQ-GAN cannot be exported to it")
    return dict(
        embed_dim=config.embed_dim,
        num_embeddings=config.n_embed,
        double_latent=False,
        latent_channels=config.z_channels,
        resolution=config.resolution,
        in_channels=config.in_channels,
        base_channels=config.ch,
        channel_multiplier=list(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions) or None,
        dropout=config.dropout,
        attn_type="vanilla" if config.mid_attn else "none",
    )


HF_VQ_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")


def hf_vq_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a VQModel state dict that Chameleon's format holds (no quantizer training buffers);
    the decoder's are there only if the model has one."""
    return {k: v for k, v in state.items() if k.startswith(HF_VQ_KEYS)}


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], (B, C, H, W) x2 -> (B,)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def code_stats(codes: torch.Tensor, n_embed: int) -> dict:
    """Codebook usage (% of codes used) and perplexity of a set of codes."""
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=n_embed).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean() * 100), "perplexity": float(math.exp(entropy))}
