"""Image IO for the VQ-GAN: files / PIL images <-> (3, R, R) tensors in [-1, 1].

Preprocessing follows Meta's Chameleon image tokenizer for any VQ-GAN: transparent pixels blended
over white, the short side resized to the VQ-GAN's resolution with LANCZOS, the centre square
cropped, pixels mapped to [-1, 1]. An image that is already R x R RGB passes unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from interleaf.errors import InterleafError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def open_image(src: str | Path | Image.Image) -> Image.Image:
    """Open a file (fully decoded) or pass a PIL image through; RGB, alpha over white."""
    if isinstance(src, Image.Image):
        img = src
    else:
        path = Path(src)
        try:
            with Image.open(path) as f:
                f.load()
                img = f.copy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise InterleafError(f"cannot read image {path}: {image_problem(e)}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`; transparent pixels are blended over white as Chameleon's tokenizer does
    (in float, then truncated to 8 bits)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        if (rgba[..., 3] == 255).all():
            return img.convert("RGB")
        alpha = rgba[..., 3:] / 255.0  # (H, W, 1) float64
        rgb = (1 - alpha) * 255 + alpha * rgba[..., :3]
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """The short side resized to `resolution` (LANCZOS, the long side rounded), then the centre
    resolution x resolution square, as Chameleon's tokenizer does."""
    w, h = img.size
    if min(w, h) == 0:
        raise InterleafError("cannot use an empty (0-pixel) image")
    scale = resolution / min(w, h)
    size = (round(scale * w), round(scale * h))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1] (x / 127.5 - 1 in float32: within one float32 step of
    Meta's x / 255 * 2 - 1 in float64)."""
    a = np.asarray(to_rgb(img), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_image(src: str | Path | Image.Image, resolution: int) -> torch.Tensor:
    """Path or PIL image -> (3, R, R) float in [-1, 1]: RGB over white, short side to R, centre crop."""
    return pil_to_tensor(resize_center_crop(open_image(src), resolution))


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (values clamped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"to_pil wants a (3, H, W) tensor, got shape {tuple(x.shape)}")
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy())


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted); InterleafError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InterleafError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InterleafError(f"no image files in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def check_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file that decodes; InterleafError naming the file otherwise.

    Cheaper than decoding every pixel, yet it finds cut files: PNG's verify() checks every
    chunk's CRC up to IEND, and opening a WebP already parses its whole container. For JPEG,
    GIF, BMP, TIFF and PPM verify() checks nothing, so they are decoded (JPEG at 1/8 scale,
    which still reads the whole stream).
    """
    try:
        with Image.open(path) as f:
            size = f.size
            if f.format == "PNG":
                f.verify()
            elif f.format != "WEBP":
                f.draft(None, (1, 1))  # no-op except for JPEG
                f.load()
        return size
    except Exception as e:  # whatever the bytes make PIL raise (OSError, SyntaxError, struct.error, ...)
        raise InterleafError(f"cannot read image {path}: {image_problem(e)}") from None


def image_problem(e: Exception, unidentified: str = "not an image file") -> str:
    """What PIL found wrong, in words (`unidentified`: for data no format of PIL's recognises)."""
    return unidentified if isinstance(e, UnidentifiedImageError) else str(e) or type(e).__name__
