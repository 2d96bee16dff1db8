"""Model directories: what an export holds, how it is written, and `load` -> `Interleaf`.

DIR/
  model.safetensors   Transformer weights (Llama names; tied output weight stored once); above
                      SHARD_BYTES, model-00001-of-0000N.safetensors ... and model.safetensors.index.json
                      instead (Hugging Face's layout for sharded weights)
  model.yaml          ModelArgs
  vocab.json          Vocabulary (specials, text ids, image-code table)
  tokenizer/          text tokenizer (tokenizer.json or spm.model)
  vqgan/              VQModel.save output (optional; encoder-only for converted Chameleon)
  hf/                 source config/tokenizer JSON of a converted HF checkpoint (optional)
  meta/               source params and VQ-GAN config of a converted Meta release (optional)
  sampling.yaml       sampling options that suit this model, e.g. its guidance scale (optional;
                      the per-model SamplingParams fields; options a caller gives win over these,
                      these over the sampler's own)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from interleaf.config import load_config, read_yaml, save_config
from interleaf.errors import ConfigError, InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.compiled import CompiledDecode
from interleaf.model.fast import apply_inference_fast_paths
from interleaf.model.transformer import Transformer
from interleaf.sampling import generate as G
from interleaf.sampling.params import PER_MODEL, SamplingParams, merge_options, options_from
from interleaf.tokenizer.multimodal import MultimodalTokenizer
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import Vocabulary
from interleaf.utils import atomic_write, read_text, write_json

# the one import inside a function (load): interleaf.tokenizer.vqgan reads its weights with this module's read_weights

MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 4 * 2**30  # weights up to this size stay one file; larger ones become shards + an index
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
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
    With `compile`, one-token decode steps run compiled (`.compiled`, model/compiled.py: for GPUs).
    """

    def __init__(
        self,
        model,
        vocab,
        text,
        vqgan=None,
        directory: str | Path | None = None,
        sampling_defaults: Mapping | None = None,
        compile: bool = False,
    ):
        self.model, self.vocab, self.text, self.vqgan = model, vocab, text, vqgan
        self.directory = Path(directory) if directory is not None else None
        vocab.check_fits(model.args.vocab_size, str(self.directory or "model"))
        self.sampling_defaults = dict(sampling_defaults or {})
        self.compiled = CompiledDecode(model) if compile else None  # what the sampler decodes with, else the model
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


def write_weights(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    produce: Callable[[str], torch.Tensor] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> list[Path]:
    """Write `tensors` as DIR/model.safetensors, or, above `shard_bytes`, as shards named by
    DIR/model.safetensors.index.json; returns the files. Weight files of the other layout are removed.

    `tensors` may hold meta tensors (a shape and a dtype): `produce(name)` then makes each value
    when its turn comes, so a conversion holds one tensor in memory, never the whole model.
    """
    directory = Path(directory)
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    groups: list[list[str]] = [[]]
    filled = 0  # bytes in the last group
    for name, size in sizes.items():
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += size
    names = (
        [MODEL_FILE]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    for old in [directory / INDEX_FILE, *directory.glob("model*.safetensors")]:
        if old.name not in names:
            old.unlink(missing_ok=True)
    for name, group in zip(names, groups):
        _write_safetensors(directory / name, {n: tensors[n] for n in group}, produce)
    if len(groups) > 1:
        weight_map = {n: name for name, group in zip(names, groups) for n in group}
        write_json(directory / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return [directory / name for name in names]


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], produce) -> None:
    """One safetensors file (8-byte header length, JSON header, raw little-endian data), written as
    each tensor comes, atomically."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned, as safetensors' own writer does
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, t in tensors.items():
            value = produce(name) if t.is_meta else t
            assert value.shape == t.shape and value.dtype == t.dtype, f"{name}: {value.shape} {value.dtype}"
            f.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_model_dir(directory: str | Path, model, vocab, text, vqgan=None) -> Path:
    """Write a model directory (weights, args, vocabulary, tokenizer, optional VQ-GAN)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_weights(directory, model_state(model))
    return save_model_files(directory, model.args, vocab, text, vqgan)


def save_model_files(directory: str | Path, args, vocab, text, vqgan=None) -> Path:
    """Everything of a model directory but its weights: args, vocabulary, tokenizer, optional VQ-GAN."""
    directory = Path(directory)
    save_config(args, directory / ARGS_FILE)
    vocab.save(directory)
    (directory / TOKENIZER_DIR).mkdir(exist_ok=True)
    text.save(directory / TOKENIZER_DIR)
    if vqgan is not None:
        vqgan.save(directory / VQGAN_DIR)
    return directory


# ---- reading ---------------------------------------------------------------------------------
def read_model_args(directory: str | Path):
    """ModelArgs from DIR/model.yaml."""
    path = Path(directory) / ARGS_FILE
    if not path.is_file():
        raise InterleafError(f"{directory} is not a model directory (no {ARGS_FILE})")
    return load_config(ModelArgs, path)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of `path`: the file itself, or a directory's shards as its
    `*.safetensors.index.json` names them, else every `*.safetensors` file in it."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise InterleafError(f"{path.parent} has no {path.name}")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise InterleafError(f"{path} holds {len(indexes)} weight indexes ({indexes[0].name}, ...): keep one")
    if not indexes:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InterleafError(f"{path} has no {MODEL_FILE}")
        return files
    weight_map = _read_index(indexes[0])
    files = [path / name for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise InterleafError(f"{f.name}, a shard that {indexes[0]} names, is missing")
    return files


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(read_text(index))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InterleafError(f"{index} is not a weight index (JSON with a weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
        raise InterleafError(f"{index}: weight_map must map tensor names to file names in its folder")
    return weight_map


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a directory's weights (`weight_files`); a missing,
    unreadable or inconsistent file is an InterleafError."""
    return WeightsSource(path).tensors()


class WeightsSource:
    """The tensors of a safetensors file or of a directory's weights (`weight_files`), by name: whole
    (`tensors`), or a flat range at a time (`read`, a `model.init.TensorSource`).

    Each file is opened with safetensors' `safe_open` (memory-mapped) and a read takes only the rows
    that hold the range asked for: a training run that starts from the directory fills each
    parameter, or under ZeRO-3 each rank its partition of it, without the whole model in memory.
    `shapes` holds every tensor's shape, read from the file headers. A missing, unreadable or
    inconsistent file (a tensor in two files, an index that does not match its shards) is an
    InterleafError.
    """

    def __init__(self, path: str | Path):
        self.directory = Path(path)
        self._files: dict[str, object] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in weight_files(self.directory):
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for cut or corrupt files
                raise InterleafError(f"cannot read {f}: {e}") from None
            for name in handle.keys():
                if name in self._files:
                    raise InterleafError(f"tensor {name} appears in two files of {self.directory}")
                self._files[name] = handle
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())
        indexes = sorted(self.directory.glob("*.safetensors.index.json")) if self.directory.is_dir() else []
        if indexes:
            weight_map = _read_index(indexes[0])
            missing = [n for n in weight_map if n not in self.shapes]
            if missing or len(self.shapes) != len(weight_map):
                name = missing[0] if missing else next(n for n in self.shapes if n not in weight_map)
                raise InterleafError(f"{indexes[0]} does not match its shards (tensor {name})")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, whole, as stored."""
        try:
            return {name: handle.get_tensor(name) for name, handle in self._files.items()}
        except Exception as e:  # a file cut after its header
            raise InterleafError(f"cannot read the weights of {self.directory}: {e}") from None

    def read(self, name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Values [start, stop) of tensor `name` (of `shape`), flattened, float32 on the CPU."""
        assert self.shapes[name] == tuple(shape), (name, self.shapes[name], shape)
        row = math.prod(shape[1:])  # values per row along the first dimension
        first, last = start // row, -(-stop // row)
        rows = self._files[name].get_slice(name)[first:last]  # (last - first, *shape[1:])
        return rows.reshape(-1)[start - first * row : stop - first * row].float()


def load_model(directory: str | Path, device="cpu", dtype=None):
    """The Transformer of a model directory, in eval mode, on `device` (stored dtype unless given), with
    the inference fast paths of model/fast.py."""
    directory = Path(directory)
    args = read_model_args(directory)
    dtype = parse_dtype(dtype)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in read_weights(directory).items()}
    return apply_inference_fast_paths(Transformer.from_state_dict(args, state, str(directory)).eval())


def load(directory: str | Path, device="cpu", dtype=None, compile: bool = False) -> Interleaf:
    """Open a model directory: model, vocabulary, text tokenizer and (if present) VQ-GAN; with
    `compile`, decode with the compiled one-token step (model/compiled.py: for GPUs)."""
    from interleaf.tokenizer.vqgan import VQModel  # noqa: PLC0415

    directory = Path(directory)
    if not directory.is_dir():
        raise InterleafError(f"model directory not found: {directory}")
    sampling = read_sampling_defaults(directory)
    model = load_model(directory, device, dtype)
    vocab = Vocabulary.load(directory)
    text = TextTokenizer.load(directory / TOKENIZER_DIR)
    vqgan = VQModel.load(directory / VQGAN_DIR, device=device) if (directory / VQGAN_DIR).is_dir() else None
    return Interleaf(model, vocab, text, vqgan, directory, sampling, compile)
