"""The decoder-only transformer over the shared vocabulary: args, layers, loss, cache, conversion.

`from interleaf.model import ModelArgs, Transformer, KVCache, LossOutput` (torch is imported on
first use, so `interleaf.model.args` stays cheap for the CLI).
"""

import importlib

from interleaf.model.args import MODEL_SIZES, ModelArgs, count_params, flops_per_token

_LAZY = {
    "Transformer": "interleaf.model.transformer",
    "KVCache": "interleaf.model.cache",
    "LossOutput": "interleaf.model.loss",
}

__all__ = ["MODEL_SIZES", "ModelArgs", "count_params", "flops_per_token", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interleaf.model' has no attribute {name!r}")
