"""interleaf: early-fusion, token-based multimodal generative models (Chameleon / CM3leon family)."""

__version__ = "0.1.0"


def load(directory, device="cpu", dtype=None):
    """Open an exported model directory: returns an object with .model, .vqgan, .vocab (and generation)."""
    from interleaf.pipeline import load as _load

    return _load(directory, device=device, dtype=dtype)
