"""Hugging Face transformers' Chameleon checkpoints <-> interleaf model directories.

The HF format (Meta's Chameleon-7B/30B, Anole-7B): `config.json` (with `vq_config` and the
whole `vocabulary_map`), `*.safetensors` (`model.*`, `lm_head.weight`, `model.vqmodel.*` for the
VQ encoder, and its decoder in community conversions of Anole), `tokenizer.json` whose image
tokens are named `IMGIMG<code in letters A-J>Z`. Meta's own release layout is `interleaf.model.meta`.

Two layout differences matter:
  * RoPE: interleaf rotates interleaved pairs (Meta's layout); HF permuted the rows of q_proj /
    k_proj (and the per-head QK-norm weight and bias) to rotate halves. `from_hf` undoes the
    permutation per head, `to_hf` applies it; both are pure index permutations, so a round
    trip is bit-exact.
  * QK-norm: HF's per-head LayerNorm (weight and bias of shape (heads, head_dim), statistics over
    head_dim) is interleaf's `qk_norm: layernorm`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from interleaf.errors import InterleafError
from interleaf.model.args import ModelArgs
from interleaf.model.transformer import Transformer, check_state_dict, check_tensors, expected_shapes
from interleaf.pipeline import (
    ARGS_FILE,
    TOKENIZER_DIR,
    VQGAN_DIR,
    read_model_args,
    read_weights,
    save_model_dir,
    write_sampling_defaults,
    write_weights,
)
from interleaf.tokenizer.text import TextTokenizer
from interleaf.tokenizer.vocab import END_OF_TURN_NAME, Vocabulary
from interleaf.tokenizer.vqgan import (
    WEIGHTS_FILE,
    VQModel,
    convert_hf_vq_state_dict,
    hf_vq_tensors,
    vq_config_from_hf,
    vq_config_to_hf,
)
from interleaf.utils import atomic_dir, atomic_path, check_replaceable, read_text, write_json

HF_DIR = "hf"  # inside an interleaf model directory: the source's config and tokenizer files
VQ_PREFIX = "model.vqmodel."
# Chameleon's names for the specials of the shared vocabulary (tokenizer strings)
HF_SPECIALS = {"<bos>": "<s>", "<eos>": "</s>", "<pad>": "<pad>", "<boi>": "<racm3:break>", "<eoi>": "<eoss>"}
# and for those a release may lack: the end of a turn (Meta's sampler and transformers' processor)
HF_OPTIONAL_SPECIALS = {END_OF_TURN_NAME: "<reserved08706>"}
# Meta's sampler settings for Chameleon (and Anole's scripts): text, image tokens, and guidance toward
# the text (cfg_scale) and toward the prompt's images (image_cfg_scale)
CHAMELEON_SAMPLING = dict(
    temperature=0.7,
    top_p=0.9,
    repetition_penalty=1.2,
    image_temperature=0.7,
    image_top_p=0.9,
    cfg_scale=3.0,
    image_cfg_scale=1.2,
)

# interleaf name (inside layers.{i}.) -> (HF name inside model.layers.{i}., rope group or None)
LAYER_KEYS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", "q"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "k"),
    "attention.wv.weight": ("self_attn.v_proj.weight", None),
    "attention.wo.weight": ("self_attn.o_proj.weight", None),
    "attention.q_norm.weight": ("self_attn.q_norm.weight", "q"),
    "attention.q_norm.bias": ("self_attn.q_norm.bias", "q"),
    "attention.k_norm.weight": ("self_attn.k_norm.weight", "k"),
    "attention.k_norm.bias": ("self_attn.k_norm.bias", "k"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", None),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ---- RoPE layout ---------------------------------------------------------------------------
def rope_from_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Per head, HF's half layout [x0..x(d/2-1), y0..] -> interleaved [x0, y0, x1, y1, ...].

    `w` is a projection (n_heads * head_dim, D) or a per-head norm parameter (n_heads, head_dim).
    """
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def rope_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of rope_from_hf: interleaved pairs per head -> HF's half layout."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


# ---- configs ------------------------------------------------------------------------------
def _rope_theta(cfg: Mapping) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in (None, "default"):
        raise InterleafError(f"config.json: rope type {kind!r} is not supported (only default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def args_from_hf_config(cfg: Mapping) -> ModelArgs:
    """HF ChameleonConfig (as read from config.json) -> ModelArgs."""
    if not isinstance(cfg, Mapping):
        raise InterleafError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("model_type") != "chameleon":
        raise InterleafError(f"config.json: model_type is {cfg.get('model_type')!r}, expected 'chameleon'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise InterleafError(f"config.json: {key}=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise InterleafError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    try:
        heads = int(cfg["num_attention_heads"])
        args = ModelArgs(
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            ffn_hidden=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=_rope_theta(cfg),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            qk_norm="layernorm",
            qk_norm_eps=1e-5,  # fixed in HF's ChameleonLayerNorm
            norm_order="swin" if cfg.get("swin_norm") else "pre",
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise InterleafError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong kind: "abc" or null for a number
        raise InterleafError(f"config.json: {e}") from None
    args.validate()
    return args


def hf_config_from_args(
    args: ModelArgs,
    vocab: Vocabulary,
    vocabulary_map: dict,
    vq: dict | None,
    base: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """ModelArgs (+ vocabulary, VQ config) -> a config.json that transformers' Chameleon loads."""
    if args.qk_norm != "layernorm" or args.qk_norm_eps != 1e-5:
        raise InterleafError(
            "Chameleon always applies per-head LayerNorm QK-norm (eps 1e-5); "
            f"this model has qk_norm={args.qk_norm!r}, qk_norm_eps={args.qk_norm_eps}"
        )
    cfg = dict(base or {"architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon"})
    cfg.update(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        attention_bias=False,
        mlp_bias=False,
        swin_norm=args.norm_order == "swin",
        tie_word_embeddings=args.tie_embeddings,
    )
    if "rope_theta" in cfg and "rope_parameters" not in cfg:  # keep a legacy file's own style
        cfg["rope_theta"] = args.rope_theta
    else:
        cfg["rope_parameters"] = {"rope_theta": args.rope_theta, "rope_type": "default"}
    dtype_name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):  # the weights' dtype, if the base file records it
        if key in cfg:
            cfg[key] = dtype_name
    if base is None:
        cfg.update(
            bos_token_id=vocab.bos_id,
            eos_token_id=vocab.eos_id,
            pad_token_id=vocab.pad_id,
            dtype=dtype_name,
            vocabulary_map=vocabulary_map,
        )
        if vq is not None:
            cfg["vq_config"] = vq
    return cfg


# ---- vocabulary ------------------------------------------------------------------------------
def image_code_of(name: str) -> int | None:
    """'IMGIMGBCZ' -> 12 (letters A-J are digits 0-9); None for other token names."""
    if not (name.startswith("IMGIMG") and len(name) > 7):
        return None
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[6:-1])
    return int(digits) if digits.isdigit() else None


def image_token_name(code: int) -> str:
    """Inverse of image_code_of: 12 -> 'IMGIMGBCZ'."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def is_special_name(name: str) -> bool:
    """Whether Meta's sampler counts a token as special, never text: its name starts with "<" and is
    not "<" itself (the <reserved#####>, <sentinel:…> and other <…> names, and BPE pieces such as "</")."""
    return name.startswith("<") and name != "<"


def vocab_from_hf(vocabulary_map: Mapping[str, int], vocab_size: int, image_grid: tuple[int, int]) -> Vocabulary:
    """Chameleon's token table -> Vocabulary with its own ids (image code i -> id of IMGIMG<i>).

    Text ids are the names Meta's sampler takes as text: every id named neither IMGIMG… nor special
    (`is_special_name`) and below the highest named id; the other special and unnamed ids there are
    `other_specials`, never sampled, and ids above are padding.
    """
    codes = {}
    for name, i in vocabulary_map.items():
        c = image_code_of(name)
        if c is not None:
            codes[c] = int(i)
    if not codes:
        raise InterleafError("the tokenizer has no IMGIMG... image tokens: not a Chameleon vocabulary")
    if sorted(codes) != list(range(len(codes))):
        raise InterleafError(f"image tokens do not cover codes 0..{len(codes) - 1} exactly")
    specials = {}
    for ours, theirs in HF_SPECIALS.items():
        if theirs not in vocabulary_map:
            raise InterleafError(f"the tokenizer has no {theirs!r} token (needed as {ours})")
        specials[ours] = int(vocabulary_map[theirs])
    specials.update({ours: int(vocabulary_map[t]) for ours, t in HF_OPTIONAL_SPECIALS.items() if t in vocabulary_map})
    name_of = {int(i): name for name, i in vocabulary_map.items() if 0 <= int(i) < vocab_size}
    n_text = max(name_of) + 1
    taken = set(specials.values()) | set(codes.values())
    others = [i for i in range(n_text) if i not in taken and (i not in name_of or is_special_name(name_of[i]))]
    return Vocabulary(
        size=vocab_size,
        n_text=n_text,
        image_ids=[codes[c] for c in range(len(codes))],
        image_grid=image_grid,
        specials=specials,
        other_specials=others,
    )


def vocabulary_map_of(vocab: Vocabulary, text) -> dict[str, int]:
    """Token name -> id for a config.json: the text tokenizer's table plus IMGIMG names for codes."""
    table = {}
    for i in range(min(text.vocab_size, vocab.size)):
        name = text.id_to_token(i)
        if name is not None:
            table[name] = i
    for ours, theirs in HF_SPECIALS.items():
        table.setdefault(theirs, vocab.specials[ours])
    for code, i in enumerate(vocab.image_ids):
        table[image_token_name(code)] = int(i)
    return table


# ---- weights --------------------------------------------------------------------------------
def _hf_name(key: str) -> str:
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    _, i, rest = key.split(".", 2)
    return f"model.layers.{i}.{LAYER_KEYS[rest][0]}"


def _rope_heads(key: str, args: ModelArgs) -> int | None:
    if key in TOP_KEYS:
        return None
    group = LAYER_KEYS[key.split(".", 2)[2]][1]
    return {"q": args.n_heads, "k": args.n_kv_heads, None: None}[group]


def state_dict_from_hf(hf: Mapping[str, torch.Tensor], args: ModelArgs, source: str = "checkpoint") -> dict:
    """HF Chameleon tensors -> Transformer state dict (the VQ model's tensors are left aside); the
    first missing, unexpected or mis-shaped tensor of the text model is an InterleafError."""
    expected = expected_shapes(args)
    text_part = {k: v for k, v in hf.items() if not k.startswith(VQ_PREFIX)}
    check_tensors(text_part, {_hf_name(k): shape for k, shape in expected.items()}, source, "config.json")
    out = {}
    for k in expected:
        w, heads = hf[_hf_name(k)], _rope_heads(k, args)
        out[k] = rope_from_hf(w, heads, args.head_dim) if heads else w
    return out


def state_dict_to_hf(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict:
    """Transformer state dict -> HF Chameleon tensor names and RoPE layout."""
    out = {}
    for k, w in state.items():
        if k == "output.weight" and args.tie_embeddings:
            continue
        heads = _rope_heads(k, args)
        out[_hf_name(k)] = rope_to_hf(w, heads, args.head_dim) if heads else w.contiguous()
    return out


def token_table(tokenizer_json: Path) -> dict[str, int]:
    """Token name -> id of a tokenizers JSON file: its model's vocab and its added tokens."""
    data = read_json(tokenizer_json)
    model_part = data.get("model")
    vocab = model_part.get("vocab") if isinstance(model_part, Mapping) else None
    if not isinstance(vocab, Mapping):
        raise InterleafError(f"{tokenizer_json}: model.vocab is not a token table")
    added = {t["content"]: t["id"] for t in data.get("added_tokens") or [] if isinstance(t, Mapping) and "id" in t}
    return {**vocab, **added}


def read_json(path: Path) -> dict:
    """A JSON object from a file; a missing, malformed or non-object file is an InterleafError."""
    if not path.is_file():
        raise InterleafError(f"{path.parent} has no {path.name}")
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InterleafError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InterleafError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ---- whole directories -----------------------------------------------------------------------
def from_hf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert an HF Chameleon directory into an interleaf model directory; returns dst.

    `dtype` casts the transformer; the VQ-GAN keeps its stored weights (it runs in float32).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InterleafError(f"source directory not found: {src}")
    check_destination(dst, ("model.yaml", "vocab.json", f"{HF_DIR}/config.json"))  # an earlier from-hf
    cfg = read_json(src / "config.json")
    args = args_from_hf_config(cfg)
    hf = read_weights(src)
    text_part = {k: v for k, v in hf.items() if not k.startswith(VQ_PREFIX)}
    if dtype is not None:
        text_part = {k: v.to(dtype) if v.is_floating_point() else v for k, v in text_part.items()}
    model = Transformer.from_state_dict(args, state_dict_from_hf(text_part, args, source=str(src)), str(src))
    vq_state = convert_hf_vq_state_dict({k: v for k, v in hf.items() if k.startswith(VQ_PREFIX)})
    vqgan = None
    if vq_state:
        if "vq_config" not in cfg:
            raise InterleafError(f"{src}/config.json has VQ weights but no vq_config")
        vqgan = VQModel(
            vq_config_from_hf(cfg["vq_config"], has_decoder=any(k.startswith("decoder.") for k in vq_state))
        )
        vqgan.load_weights(vq_state, source=str(src))
        vqgan.to(next(iter(vq_state.values())).dtype)  # stored as the source holds it: to-hf is then exact
    grid = vqgan.grid if vqgan is not None else _grid_from_vq_config(cfg.get("vq_config") or {})
    if not (src / "tokenizer.json").is_file():
        raise InterleafError(f"{src} has no tokenizer.json")
    text = TextTokenizer.load(src / "tokenizer.json")
    vocab_map = cfg.get("vocabulary_map")
    if not vocab_map:
        vocab_map = token_table(src / "tokenizer.json")
    if not isinstance(vocab_map, Mapping):
        raise InterleafError(f"{src}: config.json's vocabulary_map is not a token table")
    vocab = vocab_from_hf(vocab_map, args.vocab_size, grid)

    with atomic_dir(dst, "destination") as tmp:
        save_model_dir(tmp, model, vocab, text, vqgan)
        _copy(src / "tokenizer.json", tmp / "tokenizer" / "tokenizer.json")  # the exact bytes
        for f in sorted(src.glob("*.json")):
            if f.name not in ("tokenizer.json",) and not f.name.endswith(".index.json"):
                _copy(f, tmp / HF_DIR / f.name)
        write_sampling_defaults(tmp, **CHAMELEON_SAMPLING)
    return dst


def check_destination(dst: Path, earlier: tuple[str, ...] = (), command: str = "from-hf") -> None:
    """A conversion writes a new folder, fills an empty one or replaces an earlier one it can tell
    `command` wrote (holding all the `earlier` files): never mixed with other files."""
    check_replaceable(dst, "destination")
    if dst.is_dir() and any(dst.iterdir()) and not (earlier and all((dst / f).is_file() for f in earlier)):
        raise InterleafError(
            f"destination {dst} is not empty{f' nor an earlier {command} output' if earlier else ''}: "
            "choose an empty or new folder"
        )


HF_CHANNEL_MULTIPLIER = [1, 1, 2, 2, 4]  # ChameleonVQVAEConfig's default: 16x downsampling


def _grid_from_vq_config(vq: Mapping) -> tuple[int, int]:
    side = int(vq.get("resolution", 512)) // 2 ** (len(vq.get("channel_multiplier", HF_CHANNEL_MULTIPLIER)) - 1)
    return side, side


def _grid_vq_config(vocab: Vocabulary, src: Path) -> dict:
    """A model without a VQ-GAN still has an image grid and a code count. The HF format can say them
    only in `vq_config` (a VQ encoder's grid is its input size over 2^(len(channel_multiplier) - 1);
    transformers' defaults mean 32x32 codes of 8192), so write the fields `from_hf` reads back."""
    h, w = vocab.image_grid
    if h != w:
        raise InterleafError(f"{src}: the image grid is {h}x{w}, but the HF Chameleon format holds only square grids")
    return dict(
        resolution=h * 2 ** (len(HF_CHANNEL_MULTIPLIER) - 1),
        channel_multiplier=list(HF_CHANNEL_MULTIPLIER),
        num_embeddings=len(vocab.image_ids),
    )


def _copy(a: Path, b: Path) -> None:
    with atomic_path(b) as tmp:
        shutil.copyfile(a, tmp)


def to_hf(src: str | Path, dst: str | Path) -> Path:
    """Write an interleaf model directory as an HF Chameleon directory; returns dst."""
    src, dst = Path(src), Path(dst)
    if not (src / ARGS_FILE).is_file():
        raise InterleafError(f"{src} is not an interleaf model directory (no {ARGS_FILE})")
    check_destination(dst)  # an HF folder looks the same whoever wrote it: never replaced
    args = read_model_args(src)
    state = read_weights(src)
    check_state_dict(state, args, str(src))
    vocab = Vocabulary.load(src)
    text = TextTokenizer.load(src / TOKENIZER_DIR)
    vq_state, vq_cfg = {}, None
    if (src / VQGAN_DIR).is_dir():
        vq_cfg = vq_config_to_hf(VQModel.load(src / VQGAN_DIR).config)
        vq_state = read_weights(src / VQGAN_DIR / WEIGHTS_FILE)  # raw: keeps the stored dtype
    else:
        vq_cfg = _grid_vq_config(vocab, src)
    base = read_json(src / HF_DIR / "config.json") if (src / HF_DIR / "config.json").is_file() else None
    dtype = state["tok_embeddings.weight"].dtype
    cfg = hf_config_from_args(args, vocab, vocabulary_map_of(vocab, text), vq_cfg, base, dtype)
    hf = state_dict_to_hf(state, args)
    hf.update({VQ_PREFIX + k: v for k, v in hf_vq_tensors(vq_state).items()})

    with atomic_dir(dst, "destination") as tmp:
        write_weights(tmp, hf)
        write_json(tmp / "config.json", cfg)
        tok = src / TOKENIZER_DIR / "tokenizer.json"
        if tok.is_file():
            _copy(tok, tmp / "tokenizer.json")
        else:
            text.save(tmp)
        if (src / HF_DIR).is_dir():
            for f in sorted((src / HF_DIR).glob("*.json")):
                if f.name != "config.json":
                    _copy(f, tmp / f.name)
    return dst
