"""Image IO for the VQ-GAN: files / PIL images <-> (3, R, R) tensors in [-1, 1]."""

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
    """RGB copy of `img`; transparent pixels become white (as Chameleon's processor does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def center_square(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square and resize to resolution x resolution (LANCZOS)."""
    w, h = img.size
    s = min(w, h)
    if s == 0:
        raise InterleafError("cannot use an empty (0-pixel) image")
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    a = np.asarray(to_rgb(img), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def load_image(src: str | Path | Image.Image, resolution: int) -> torch.Tensor:
    """Path or PIL image -> (3, R, R) float in [-1, 1]: RGB, centre square crop, LANCZOS resize."""
    return pil_to_tensor(center_square(open_image(src), resolution))


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
