"""Model directories: what an export holds, how it is written, and `load` -> `Interleaf`.

DIR/
  model.safetensors   Transformer weights (Llama names; tied output weight stored once)
  model.yaml          ModelArgs
  vocab.json          Vocabulary (specials, text ids, image-code table)
  tokenizer/          text tokenizer (tokenizer.json or spm.model)
  vqgan/              VQModel.save output (optional; encoder-only for converted Chameleon)
  hf/                 source config/tokenizer JSON of a converted HF checkpoint (optional)
  sampling.yaml       sampling options that suit this model, e.g. its guidance scale (optional;
                      options a caller gives win over these, these over the sampler's own)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from interleaf.errors import ConfigError, InterleafError
from interleaf.utils import atomic_path

MODEL_FILE = "model.safetensors"
ARGS_FILE = "model.yaml"
TOKENIZER_DIR = "tokenizer"
VQGAN_DIR = "vqgan"
SAMPLING_FILE = "sampling.yaml"


def check_device(name: str | None, what: str = "device") -> torch.device:
    """A device name -> torch.device (None: cuda when available, else cpu); one that does not
    parse or is not available is an InterleafError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InterleafError(f"{what} {name!r} is not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InterleafError(f"{what} {name}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InterleafError(f"{what} {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype or a name ("bfloat16", "bf16", "float32", ...) -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InterleafError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return value


@dataclass
class SamplingDefaults:
    """Sampling options a model directory sets for itself (DIR/sampling.yaml); None = not set.

    A small model may draw best with weak guidance and a cold image temperature, a large one with
    the sampler's defaults; the demo writes what its samples use.
    """

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    image_temperature: float | None = None
    image_top_k: int | None = None
    image_top_p: float | None = None
    repetition_penalty: float | None = None
    cfg_scale: float | None = None
    image_cfg_scale: float | None = None

    def options(self) -> dict:
        """The options set, as keyword arguments of `stream`."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def validate(self) -> None:
        import math

        from interleaf.sampling.generate import Request

        for name, value in self.options().items():
            if not math.isfinite(value):
                raise InterleafError(f"{name} must be a finite number, got {value}")
        Request(prompt="", **self.options()).validate()


def with_sampling_defaults(defaults: Mapping, given: Mapping) -> dict:
    """Options for `stream`: those given, then a model's defaults for the rest. A given cfg_scale
    without image_cfg_scale guides toward images too (as in the sampler), over the file's."""
    merged = {**defaults, **given}
    if "cfg_scale" in given and "image_cfg_scale" not in given:
        merged.pop("image_cfg_scale", None)
    return merged


def read_sampling_defaults(directory: str | Path) -> dict:
    """The options DIR/sampling.yaml sets ({} without the file); a bad file is an InterleafError."""
    from interleaf.config import load_config

    path = Path(directory) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        return load_config(SamplingDefaults, path).options()
    except ConfigError as e:
        raise InterleafError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except InterleafError as e:  # a value the sampler refuses
        raise InterleafError(f"{path}: {e}") from None


def write_sampling_defaults(directory: str | Path, **options) -> Path:
    """Write DIR/sampling.yaml (atomically) with these options; checked as `read_sampling_defaults` would."""
    import yaml

    from interleaf.config import from_dict
    from interleaf.utils import atomic_write

    defaults = from_dict(SamplingDefaults, options)
    path = Path(directory) / SAMPLING_FILE
    with atomic_write(path) as f:
        yaml.safe_dump(defaults.options(), f, sort_keys=False)
    return path


class Interleaf:
    """A loaded model: `.model` `.vocab` `.text` `.vqgan` `.tokenizer`, and generation.

    `.sampling_defaults` (from DIR/sampling.yaml) fill the options `stream` / `generate` are not given.
    """

    def __init__(
        self,
        model,
        vocab,
        text,
        vqgan=None,
        directory: str | Path | None = None,
        sampling_defaults: Mapping | None = None,
    ):
        self.model, self.vocab, self.text, self.vqgan = model, vocab, text, vqgan
        self.directory = Path(directory) if directory is not None else None
        vocab.check_fits(model.args.vocab_size, str(self.directory or "model"))
        self.sampling_defaults = dict(sampling_defaults or {})
        self._tokenizer = None

    @property
    def tokenizer(self):
        """MultimodalTokenizer over this vocabulary, text tokenizer and VQ-GAN."""
        if self._tokenizer is None:
            from interleaf.tokenizer.multimodal import MultimodalTokenizer

            self._tokenizer = MultimodalTokenizer(self.vocab, self.text, self.vqgan)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def stream(self, prompt, **options):
        """Events of a generation as they happen (see interleaf.sampling.generate.stream)."""
        from interleaf.sampling.generate import stream

        return stream(self, prompt, **with_sampling_defaults(self.sampling_defaults, options))

    def generate(self, prompt, **options):
        """A whole generation (see interleaf.sampling.generate.generate)."""
        from interleaf.sampling.generate import generate

        return generate(self, prompt, **with_sampling_defaults(self.sampling_defaults, options))

    def __repr__(self) -> str:
        a = self.model.args
        return (
            f"Interleaf({self.directory or '<memory>'}: {a.n_layers} layers x {a.dim}, vocab {self.vocab.size}, "
            f"vqgan {'yes' if self.vqgan is not None else 'no'})"
        )


# ---- writing ---------------------------------------------------------------------------------
def model_state(model) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict of a Transformer; a tied output weight is stored once."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("output.weight", None)
    return state


def save_model_dir(directory: str | Path, model, vocab, text, vqgan=None) -> Path:
    """Write a model directory (weights, args, vocabulary, tokenizer, optional VQ-GAN)."""
    from safetensors.torch import save_file

    from interleaf.config import save_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / MODEL_FILE) as tmp:
        save_file(model_state(model), str(tmp), metadata={"format": "pt"})
    save_config(model.args, directory / ARGS_FILE)
    vocab.save(directory)
    (directory / TOKENIZER_DIR).mkdir(exist_ok=True)
    text.save(directory / TOKENIZER_DIR)
    if vqgan is not None:
        vqgan.save(directory / VQGAN_DIR)
    return directory


# ---- reading ---------------------------------------------------------------------------------
def read_model_args(directory: str | Path):
    """ModelArgs from DIR/model.yaml."""
    from interleaf.config import load_config
    from interleaf.model.args import ModelArgs

    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise InterleafError(f"{directory} is not a model directory (no {ARGS_FILE})")
    return load_config(ModelArgs, path)


def read_weights(path: str | Path) -> dict:
    """The tensors of a safetensors file; a missing or unreadable one is an InterleafError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InterleafError(f"{path.parent} has no {path.name}")
    try:
        return load_file(str(path))
    except Exception as e:
        raise InterleafError(f"cannot read {path}: {e}") from None


def load_model(directory: str | Path, device="cpu", dtype=None):
    """The Transformer of a model directory, in eval mode, on `device` (stored dtype unless given)."""
    from interleaf.model.transformer import Transformer

    directory = Path(directory)
    args = read_model_args(directory)
    path = directory / MODEL_FILE
    dtype = parse_dtype(dtype)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in read_weights(path).items()}
    return Transformer.from_state_dict(args, state, str(path)).eval()


def load(directory: str | Path, device="cpu", dtype=None) -> Interleaf:
    """Open a model directory: model, vocabulary, text tokenizer and (if present) VQ-GAN."""
    from interleaf.tokenizer.text import TextTokenizer
    from interleaf.tokenizer.vocab import Vocabulary
    from interleaf.tokenizer.vqgan import VQModel

    directory = Path(directory)
    if not directory.is_dir():
        raise InterleafError(f"model directory not found: {directory}")
    sampling = read_sampling_defaults(directory)
    model = load_model(directory, device, dtype)
    vocab = Vocabulary.load(directory)
    text = TextTokenizer.load(directory / TOKENIZER_DIR)
    vqgan = VQModel.load(directory / VQGAN_DIR, device=device) if (directory / VQGAN_DIR).is_dir() else None
    return Interleaf(model, vocab, text, vqgan, directory, sampling)
