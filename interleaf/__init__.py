"""interleaf: early-fusion, token-based multimodal generative models (Chameleon / CM3leon family)."""

__version__ = "0.1.0"


def load(directory, device="cpu", dtype=None, compile=False):
    """Open an exported model directory: returns an object with .model, .vqgan, .vocab (and generation);
    `compile=True` decodes with a compiled one-token step (for GPUs)."""
    from interleaf.pipeline import load as _load

    return _load(directory, device=device, dtype=dtype, compile=compile)


def __getattr__(name: str):
    """`interleaf.Image` (a prompt's image), `interleaf.END_OF_TURN` (a prompt's end of a turn) and
    `interleaf.SamplingParams`, imported when first used: the `interleaf` command imports this
    package, and its start-up should not wait for PIL."""
    if name == "Image":
        from interleaf.sampling.prompt import Image

        return Image
    if name == "END_OF_TURN":
        from interleaf.tokenizer.vocab import END_OF_TURN

        return END_OF_TURN
    if name == "SamplingParams":
        from interleaf.sampling.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'interleaf' has no attribute {name!r}")
