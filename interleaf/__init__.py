"""interleaf: early-fusion, token-based multimodal generative models (Chameleon / CM3leon family)."""

import importlib

# The `interleaf` command imports this package at start-up, so what it offers is imported on first
# use: `load` imports the pipeline (torch) when called, the names of _LAZY when first read.

__version__ = "0.1.0"

_LAZY = {
    "Image": "interleaf.sampling.prompt",  # a prompt's image
    "END_OF_TURN": "interleaf.tokenizer.vocab",  # a prompt's end of a turn
    "SamplingParams": "interleaf.sampling.params",
}


def load(directory, device="cpu", dtype=None, compile=False):
    """Open an exported model directory: returns an object with .model, .vqgan, .vocab (and generation);
    `compile=True` decodes with a compiled one-token step (for GPUs)."""
    from interleaf.pipeline import load as _load  # noqa: PLC0415

    return _load(directory, device=device, dtype=dtype, compile=compile)


def __getattr__(name: str):
    """`interleaf.Image`, `interleaf.END_OF_TURN` and `interleaf.SamplingParams`, imported when first used."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interleaf' has no attribute {name!r}")
