"""Model directories: what an export holds, how it is written, and `load` -> `Interleaf`.

DIR/
  model.safetensors   Transformer weights (Llama names; tied output weight stored once)
  model.yaml          ModelArgs
  vocab.json          Vocabulary (specials, text ids, image-code table)
  tokenizer/          text tokenizer (tokenizer.json or spm.model)
  vqgan/              VQModel.save output (optional; encoder-only for converted Chameleon)
  hf/                 source config/tokenizer JSON of a converted HF checkpoint (optional)
  sampling.yaml       sampling options that suit this model, e.g. its guidance scale (optional;
                      the per-model SamplingParams fields; options a caller gives win over these,
                      these over the sampler's own)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from interleaf.config import read_yaml
from interleaf.errors import ConfigError, InterleafError
from interleaf.sampling import generate as G
from interleaf.sampling.params import PER_MODEL, SamplingParams, merge_options, options_from
from interleaf.tokenizer.multimodal import MultimodalTokenizer
from interleaf.utils import atomic_path, atomic_write

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


def read_sampling_defaults(directory: str | Path) -> dict:
    """The options DIR/sampling.yaml sets ({} without the file); a bad file is an InterleafError."""
    path = Path(directory) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        return options_from(read_yaml(path), PER_MODEL)
    except ConfigError as e:
        raise InterleafError(str(e)) from None
    except InterleafError as e:
        raise InterleafError(f"{path}: {e}") from None


def write_sampling_defaults(directory: str | Path, **options) -> Path:
    """Write DIR/sampling.yaml (atomically) with these options; checked as `read_sampling_defaults` would."""
    options = options_from(options, PER_MODEL)
    path = Path(directory) / SAMPLING_FILE
    with atomic_write(path) as f:
        yaml.safe_dump(options, f, sort_keys=False)
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
        self.sampling_defaults = dict(sampling_defaults or {})
        self._tokenizer = None

    @property
    def tokenizer(self):
        """MultimodalTokenizer over this vocabulary, text tokenizer and VQ-GAN."""
        if self._tokenizer is None:
            self._tokenizer = MultimodalTokenizer(self.vocab, self.text, self.vqgan)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def sampling_params(self, **options) -> SamplingParams:
        """SamplingParams from the options given, this model's sampling.yaml for the rest."""
        return SamplingParams(**merge_options(self.sampling_defaults, options))

    def stream(self, prompt, **options):
        """Events of a generation as they happen (see interleaf.sampling.generate.stream)."""
        return G.stream(self, prompt, **merge_options(self.sampling_defaults, options))

    def generate(self, prompt, **options):
        """A whole generation (see interleaf.sampling.generate.generate)."""
        return G.generate(self, prompt, **merge_options(self.sampling_defaults, options))

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
    if vocab.size > model.args.vocab_size:
        raise InterleafError(f"vocabulary of {vocab.size} ids does not fit the model's {model.args.vocab_size} outputs")
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


def check_state_dict(state: Mapping[str, torch.Tensor], args, source: str) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor for a Transformer(args)."""
    from interleaf.model.transformer import Transformer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise InterleafError(
            f"{source}: missing tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        raise InterleafError(f"{source}: unexpected tensor {unexpected[0]} (not in a model with this model.yaml)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise InterleafError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, model.yaml implies {shape}")


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
    state = read_weights(path)
    check_state_dict(state, args, str(path))
    dtype = parse_dtype(dtype)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


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
    if vocab.size > model.args.vocab_size:
        raise InterleafError(
            f"{directory}: vocabulary of {vocab.size} ids does not fit the model's {model.args.vocab_size} outputs"
        )
    text = TextTokenizer.load(directory / TOKENIZER_DIR)
    vqgan = VQModel.load(directory / VQGAN_DIR, device=device) if (directory / VQGAN_DIR).is_dir() else None
    return Interleaf(model, vocab, text, vqgan, directory, sampling)
