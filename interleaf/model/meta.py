"""Meta's Chameleon release layout (Anole-7b-v0.1 ships in it too) -> an interleaf model directory.

    SRC/models/7b/   params.json (model fields under "model"), consolidate_params.json (merged over it as
                     Meta's loader does: {**p, **p["model"], **c}), consolidated.pth or model-parallel
                     shards consolidated.00.pth ... consolidated.NN.pth
    SRC/tokenizer/   text_tokenizer.json (image codes named IMGIMG...), vqgan.yaml (taming's model.params
                     and ddconfig), vqgan.ckpt (a Lightning checkpoint: weights under state_dict,
                     discriminator and perceptual loss under loss.*)

The weights already carry Llama names and interleaved-pair RoPE (nothing to permute). A model-parallel
shard holds a slice of each tensor along one dimension (`LAYER_KEYS`, `TOP_KEYS`); norms are
replicated; the q/k LayerNorms are one (head_dim,) weight and bias per shard, shared by that shard's
heads, which interleaf's per-head LayerNorm repeats; `rope.freqs` is a buffer and is dropped.

Memory: every .pth / .ckpt is read with torch.load(weights_only=True, mmap=True), and the output is
written one tensor at a time (`pipeline.write_weights`). The shards are mapped afresh for every layer,
so that the pages read for the last one are let go: peak memory is about one layer, not the model.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from interleaf.config import read_yaml
from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.convert import CHAMELEON_SAMPLING, check_destination, read_json, token_table, vocab_from_hf
from interleaf.model.transformer import check_tensors, expected_shapes
from interleaf.pipeline import save_model_files, write_sampling_defaults, write_weights
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vqgan import VQModel, convert_hf_vq_state_dict, vq_config_from_taming
from interleaf.utils import atomic_dir, first_line

META_DIR = "meta"  # inside the output: the source's params and VQ-GAN config, as they were
PARAMS_FILES = ("params.json", "consolidate_params.json")
TOKENIZER_FILE, VQ_CONFIG_FILE, VQ_WEIGHTS_FILE = "text_tokenizer.json", "vqgan.yaml", "vqgan.ckpt"
DROPPED = ("rope.freqs",)  # buffers Meta's checkpoints carry and its loader ignores

# interleaf name inside layers.{i}. -> (Meta's name, how shards hold it: the dimension they split,
# None for a replicated norm, "q"/"k" for the per-shard LayerNorm of the query/key heads)
LAYER_KEYS: dict[str, tuple[str, int | str | None]] = {
    "attention.wq.weight": ("attention.wq.weight", 0),
    "attention.wk.weight": ("attention.wk.weight", 0),
    "attention.wv.weight": ("attention.wv.weight", 0),
    "attention.wo.weight": ("attention.wo.weight", 1),
    "attention.q_norm.weight": ("attention.q_normalization.weight", "q"),
    "attention.q_norm.bias": ("attention.q_normalization.bias", "q"),
    "attention.k_norm.weight": ("attention.k_normalization.weight", "k"),
    "attention.k_norm.bias": ("attention.k_normalization.bias", "k"),
    "feed_forward.w1.weight": ("feed_forward.w1.weight", 0),
    "feed_forward.w2.weight": ("feed_forward.w2.weight", 1),
    "feed_forward.w3.weight": ("feed_forward.w3.weight", 0),
    "attention_norm.weight": ("attention_norm.weight", None),
    "ffn_norm.weight": ("ffn_norm.weight", None),
}
TOP_KEYS: dict[str, int | None] = {"tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0}


# ---- where things are -------------------------------------------------------------------------
def find_release(src: Path, tokenizer: Path | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a release: SRC holding models/ and tokenizer/, or the
    model folder itself (then the tokenizer folder is --tokenizer, else the release's own two levels up)."""
    if not src.is_dir():
        raise InterleafError(f"source folder not found: {src}")
    if (src / "params.json").is_file():
        model_dir = src
    elif (src / "models").is_dir():
        found = sorted(p.parent for p in (src / "models").glob("*/params.json"))
        if len(found) != 1:
            what = (
                "no model folder" if not found else f"{len(found)} model folders ({', '.join(p.name for p in found)})"
            )
            raise InterleafError(f"{src}/models holds {what} with a params.json: give the model folder itself")
        model_dir = found[0]
    else:
        raise InterleafError(f"{src} is not a Chameleon release: it has neither params.json nor models/")
    if tokenizer is None:
        tokenizer = src / "tokenizer" if model_dir != src else src.parent.parent / "tokenizer"
        if not tokenizer.is_dir():
            raise InterleafError(f"{src}: no tokenizer folder found next to the model: give --tokenizer DIR")
    for name in (TOKENIZER_FILE, VQ_CONFIG_FILE, VQ_WEIGHTS_FILE):
        if not (tokenizer / name).is_file():
            raise InterleafError(f"tokenizer folder {tokenizer} has no {name}")
    return model_dir, tokenizer


def read_params(model_dir: Path) -> dict:
    """params.json merged with consolidate_params.json (if there) as Meta's loader merges them."""
    params = read_json(model_dir / "params.json")
    if not isinstance(params.get("model", {}), dict):
        raise InterleafError(f"{model_dir}/params.json: 'model' must hold the model's fields")
    consolidate = model_dir / "consolidate_params.json"
    return {**params, **params.get("model", {}), **(read_json(consolidate) if consolidate.is_file() else {})}


def args_from_params(params: Mapping, source: str = "params.json") -> tuple[ModelArgs, int | None]:
    """Meta's ModelArgs fields -> (ModelArgs, model_parallel_size if the params say it)."""
    try:
        heads = int(params["n_heads"])
        args = ModelArgs(
            dim=int(params["dim"]),
            n_layers=int(params["n_layers"]),
            n_heads=heads,
            n_kv_heads=int(params.get("n_kv_heads") or heads),
            vocab_size=int(params["vocab_size"]),
            multiple_of=int(params.get("multiple_of", 256)),
            ffn_multiplier=float(params.get("ffn_dim_multiplier") or 1.0),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=int(params.get("max_seq_len", 4096)),
            qk_norm="layernorm" if params.get("qk_normalization") else "none",
            qk_norm_eps=1e-5,  # torch.nn.LayerNorm's default, as Meta builds it
            norm_order="swin" if params.get("swin_norm") else "pre",
        )
        mp = int(params["model_parallel_size"]) if params.get("model_parallel_size") is not None else None
    except KeyError as e:
        raise InterleafError(f"{source} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong kind
        raise InterleafError(f"{source}: {e}") from None
    try:
        args.validate()
    except InterleafError as e:
        raise InterleafError(f"{source}: {e}") from None
    return args, mp


def shard_paths(model_dir: Path, mp: int | None) -> list[Path]:
    """consolidated.pth, or the model-parallel shards consolidated.00.pth ... (all of them, in order)."""
    numbered = {p.name: p for p in model_dir.glob("consolidated.*.pth")}
    if mp is None:  # count them: the highest number says how many there should be
        numbers = [int(n.split(".")[1]) for n in numbered if n.split(".")[1].isdigit()]
        mp = max(numbers) + 1 if numbers else 1
    if mp == 1 and (model_dir / "consolidated.pth").is_file():
        return [model_dir / "consolidated.pth"]
    names = [f"consolidated.{i:02d}.pth" for i in range(mp)]
    for i, name in enumerate(names):
        if name not in numbered:
            what = (
                "consolidated.pth or consolidated.00.pth"
                if mp == 1
                else f"{name} (model-parallel shard {i + 1} of {mp})"
            )
            raise InterleafError(f"{model_dir} has no {what}")
    extra = sorted(set(numbered) - set(names))
    if extra:
        raise InterleafError(f"{model_dir} holds {extra[0]}, but its params say model_parallel_size {mp}")
    return [numbered[n] for n in names]


def load_pth(path: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped; a file holding other objects is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        culprit = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), first_line(e))
        raise InterleafError(
            f"{path} holds pickled objects other than tensors, refused (only weights are loaded): {culprit}"
        ) from None
    except RuntimeError as e:
        if "mmap can only be used" in str(e) or "zip archive" in str(e):
            raise InterleafError(f"cannot read {path}: not a checkpoint in torch.save's zip format") from None
        raise InterleafError(f"cannot read {path}: {first_line(e)}") from None


def _tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A shard's name -> tensor table, with Meta's buffers dropped."""
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InterleafError(f"{path} is not a table of named tensors (a model checkpoint)")
    return {k: v for k, v in obj.items() if k not in DROPPED}


# ---- names and shapes --------------------------------------------------------------------------
def source_of(name: str) -> tuple[str, int | str | None, str]:
    """interleaf tensor name -> (Meta's name, how shards hold it, the group it is read with)."""
    if name in TOP_KEYS:
        return name, TOP_KEYS[name], "top"
    _, i, rest = name.split(".", 2)
    meta, split = LAYER_KEYS[rest]
    return f"layers.{i}.{meta}", split, f"layer {i}"


def shard_shapes(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], mp: int) -> dict[str, tuple[int, ...]]:
    """Meta's name -> the shape of that tensor (whole: `shapes`) in each of `mp` model-parallel shards."""
    out = {}
    for name, shape in shapes.items():
        meta, split, _ = source_of(name)
        if split in ("q", "k"):
            out[meta] = (args.head_dim,)
        elif split is None:
            out[meta] = shape
        else:
            out[meta] = tuple(n // mp if d == split else n for d, n in enumerate(shape))
    return out


def check_shards(shards: list[dict[str, torch.Tensor]], paths: list[Path], args: ModelArgs, params: str) -> None:
    """The shards are slices of one model, and the one `params` describes; else an InterleafError."""
    shapes = expected_shapes(args)
    mp = len(shards)
    for what, n in [("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("dim", args.dim),
                    ("vocab_size", args.vocab_size), ("the feed-forward width", args.ffn_hidden)]:  # fmt: skip
        if n % mp:
            raise InterleafError(f"{params}: {what} = {n} does not split into {mp} model-parallel shards")
    first = shards[0]
    for shard, path in zip(shards[1:], paths[1:]):
        one_only = sorted(set(first) ^ set(shard))
        differs = next((k for k in first if k in shard and first[k].shape != shard[k].shape), None)
        if one_only:
            raise InterleafError(
                f"{paths[0].name} and {path.name} are not shards of one model: {one_only[0]} is in one only"
            )
        if differs:
            raise InterleafError(
                f"{paths[0].name} and {path.name} are not shards of one model: {differs} is "
                f"{tuple(first[differs].shape)} in one, {tuple(shard[differs].shape)} in the other"
            )
    check_tensors(first, shard_shapes(args, shapes, mp), str(paths[0]), params)
    for name in shapes:
        meta, split, _ = source_of(name)
        if not first[meta].is_floating_point():
            raise InterleafError(f"{paths[0]}: tensor {meta} holds {first[meta].dtype}, not floating-point weights")
        if split is None:
            for shard, path in zip(shards[1:], paths[1:]):
                if not torch.equal(shard[meta], first[meta]):
                    raise InterleafError(
                        f"{paths[0].name} and {path.name} are not shards of one model: their {meta} differ"
                    )


class ShardReader:
    """The shards of a release, mapped for one group of tensors (a layer) at a time: mapping them
    afresh for the next group lets the pages read for the last one go."""

    def __init__(self, paths: list[Path]):
        self.paths, self.group, self.shards = paths, None, []

    def pieces(self, meta: str, group: str) -> list[torch.Tensor]:
        """Tensor `meta` of every shard (views into the mapped files); a new `group` maps them afresh."""
        if group != self.group:
            self.shards = []  # unmap first
            self.shards = [_tensors(load_pth(p), p) for p in self.paths]
            self.group = group
        return [s[meta] for s in self.shards]

    def close(self) -> None:
        """Let the mapped files go."""
        self.shards, self.group = [], None


def merged_tensor(name: str, pieces: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """The whole of tensor `name` (interleaf's layout) from its model-parallel pieces."""
    _, split, _ = source_of(name)
    if split is None:
        return pieces[0]
    if split in ("q", "k"):  # heads of shard i take shard i's (head_dim,) weights
        heads = args.n_heads if split == "q" else args.n_kv_heads
        return torch.stack(pieces).repeat_interleave(heads // len(pieces), dim=0)  # (heads, head_dim)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=split)


# ---- the conversion ----------------------------------------------------------------------------
def read_vqgan(tokenizer_dir: Path) -> VQModel:
    """The release's VQ-GAN (encoder and decoder) from vqgan.yaml + vqgan.ckpt, in float32."""
    cfg_path = tokenizer_dir / VQ_CONFIG_FILE
    cfg = read_yaml(cfg_path)
    params = cfg.get("model", {}).get("params") if isinstance(cfg.get("model"), dict) else None
    vqgan = VQModel(vq_config_from_taming(params, str(cfg_path)))
    ckpt_path = tokenizer_dir / VQ_WEIGHTS_FILE
    ckpt = load_pth(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise InterleafError(f"{ckpt_path} has no state_dict: not a Lightning VQ-GAN checkpoint")
    vqgan.load_weights(convert_hf_vq_state_dict(ckpt), source=str(ckpt_path))  # copied into float32; loss.* dropped
    return vqgan.eval()


def from_meta(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, tokenizer: str | Path | None = None
) -> Path:
    """Convert Meta's (or Anole's) release into an interleaf model directory; returns dst.

    `dtype` casts the transformer (default: as stored); the VQ-GAN stays float32.
    """
    src, dst = Path(src), Path(dst)
    model_dir, tok_dir = find_release(src, Path(tokenizer) if tokenizer is not None else None)
    check_destination(dst, ("model.yaml", "vocab.json", f"{META_DIR}/params.json"), "from-meta")
    params_name = " + ".join(n for n in PARAMS_FILES if (model_dir / n).is_file())
    args, mp = args_from_params(read_params(model_dir), f"{model_dir}/{params_name}")
    paths = shard_paths(model_dir, mp)
    shards = [_tensors(load_pth(p), p) for p in paths]
    check_shards(shards, paths, args, params_name)
    layout = {}  # interleaf name -> meta tensor: the shape and dtype each value will have
    for name, shape in expected_shapes(args).items():
        meta, _, _ = source_of(name)
        layout[name] = torch.empty(shape, dtype=dtype or shards[0][meta].dtype, device="meta")
    del shards

    vqgan = read_vqgan(tok_dir)
    text = TextTokenizer.load(tok_dir / TOKENIZER_FILE)
    vocab = vocab_from_hf(token_table(tok_dir / TOKENIZER_FILE), args.vocab_size, vqgan.grid)
    if vocab.n_codes != vqgan.config.n_embed:
        raise InterleafError(
            f"{tok_dir}: {TOKENIZER_FILE} names {vocab.n_codes} image codes, the VQ-GAN has {vqgan.config.n_embed}"
        )
    vocab.check_fits(args.vocab_size, str(model_dir))

    reader = ShardReader(paths)
    total = sum(t.numel() * t.element_size() for t in layout.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=None)

    def produce(name: str) -> torch.Tensor:
        meta, _, group = source_of(name)
        value = merged_tensor(name, reader.pieces(meta, group), args).to(layout[name].dtype)
        bar.update(value.numel() * value.element_size())
        return value

    try:
        with atomic_dir(dst, "destination") as tmp:
            save_model_files(tmp, args, vocab, text, vqgan)
            vqgan = None  # written: let its memory go before the weights stream through
            write_weights(tmp, layout, produce)
            reader.close()
            shutil.copyfile(tok_dir / TOKENIZER_FILE, tmp / "tokenizer" / "tokenizer.json")  # the exact bytes
            (tmp / META_DIR).mkdir()
            for f in [model_dir / n for n in PARAMS_FILES] + [tok_dir / VQ_CONFIG_FILE]:
                if f.is_file():
                    shutil.copyfile(f, tmp / META_DIR / f.name)
            write_sampling_defaults(tmp, **CHAMELEON_SAMPLING)
    finally:
        bar.close()
        reader.close()
    return dst
