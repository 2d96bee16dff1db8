"""ModelArgs: the one dataclass that fixes a model's shape, plus named sizes and accounting.

A model directory stores its ModelArgs as `model.yaml`; named sizes live in `MODEL_SIZES` and in
`configs/model/<name>.yaml` (the YAML files are the same table, for `load_config` overrides).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from interleaf.errors import ConfigError

# the `interleaf` command reads MODEL_SIZES to build its parser: interleaf.config (and yaml) is imported
# by the functions that read configs


def ffn_hidden_size(dim: int, multiple_of: int = 256, multiplier: float = 1.0) -> int:
    """Llama/Chameleon SwiGLU width: 8/3 * dim, scaled, rounded up to `multiple_of`."""
    hidden = int(multiplier * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Shape and recipe of a decoder-only transformer over the shared vocabulary."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); fewer = GQA; 1 = MQA
    vocab_size: int = 1024
    ffn_hidden: int | None = None  # None = ffn_hidden_size(dim, multiple_of, ffn_multiplier)
    multiple_of: int = 256
    ffn_multiplier: float = 1.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    dropout: float = 0.0  # residual dropout on the attention and feed-forward outputs
    # "none"; "rms": RMSNorm over head_dim, one weight shared by all heads; "layernorm":
    # LayerNorm over head_dim with a separate weight and bias per head (Chameleon)
    qk_norm: Literal["none", "rms", "layernorm"] = "none"
    qk_norm_eps: float = 1e-5
    # "pre": h = x + attn(norm(x)); "swin" (Chameleon-34B): h = x + norm(attn(x))
    norm_order: Literal["pre", "swin"] = "pre"
    tie_embeddings: bool = False
    init_std: float = 0.02  # output projections (wo, w2) get init_std / sqrt(2 * n_layers)
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    z_loss: float = 1e-5  # coefficient of log^2 Z in the training loss
    loss_chunk: int = 1024  # tokens per chunk of the output head in the loss

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = ffn_hidden_size(self.dim, self.multiple_of, self.ffn_multiplier)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "max_seq_len", "loss_chunk")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model.init_std, model.norm_eps and model.rope_theta must be positive")
        if self.z_loss < 0:
            raise ConfigError(f"model.z_loss must be >= 0, got {self.z_loss}")

    # ---- named sizes ----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        """A named size from MODEL_SIZES, with field overrides."""
        if name not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {name!r} (known: {', '.join(MODEL_SIZES)})")
        from interleaf.config import from_dict  # noqa: PLC0415

        # from the table, not the resolved args: overriding dim then re-derives ffn_hidden
        return from_dict(cls, {**SIZE_TABLE[name], **overrides}, prefix="model")

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes. Chameleon shapes follow the released checkpoints (vocabulary 65,536; 7B: no norm
# reordering, 34B: "swin" reordering, GQA with 8 key/value heads); both use per-head LayerNorm
# QK-norm and z-loss. vocab_size of the interleaf sizes is a default: training sets it from the
# vocabulary it builds.
SIZE_TABLE: dict[str, dict] = {
    "debug": dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        multiple_of=32,
        max_seq_len=256,
        qk_norm="layernorm",
    ),
    "shapes-tiny": dict(
        dim=192, n_layers=4, n_heads=6, vocab_size=2048, multiple_of=64, max_seq_len=1024, qk_norm="layernorm"
    ),
    "100M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32768, max_seq_len=4096, qk_norm="layernorm"),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, vocab_size=32768, max_seq_len=4096, qk_norm="layernorm"),
    "1B": dict(
        dim=2048, n_layers=18, n_heads=16, n_kv_heads=8, vocab_size=65536, max_seq_len=4096, qk_norm="layernorm"
    ),
    "chameleon-7b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        vocab_size=65536,
        max_seq_len=4096,
        qk_norm="layernorm",
        norm_order="pre",
        dropout=0.1,
    ),
    "chameleon-34b": dict(
        dim=8192,
        n_layers=48,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=65536,
        max_seq_len=4096,
        qk_norm="layernorm",
        norm_order="swin",
    ),
}
MODEL_SIZES: dict[str, ModelArgs] = {name: ModelArgs(**fields) for name, fields in SIZE_TABLE.items()}


def load_model_args(path_or_name: str | Path, overrides=()) -> ModelArgs:
    """A YAML file, a model directory (its model.yaml) or a named size -> validated ModelArgs."""
    from interleaf.config import load_config, parse_overrides  # noqa: PLC0415

    p = Path(path_or_name)
    if p.is_dir():
        p = p / "model.yaml"
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_file() and not p.read_bytes().strip():
            raise ConfigError(f"model config {p} is empty")
        return load_config(ModelArgs, p, overrides)
    if str(path_or_name) in MODEL_SIZES:
        extra = parse_overrides(overrides)
        return ModelArgs.from_name(str(path_or_name), **extra)
    raise ConfigError(
        f"{path_or_name}: not a model config file, model directory or named size "
        f"(known sizes: {', '.join(MODEL_SIZES)})"
    )


# ---- accounting ------------------------------------------------------------------------------
def count_params(args: ModelArgs, embeddings: bool = True) -> int:
    """Number of parameters of Transformer(args); `embeddings=False` leaves out the input table."""
    d, hd = args.dim, args.head_dim
    attn = d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d
    if args.qk_norm == "layernorm":
        attn += 2 * hd * (args.n_heads + args.n_kv_heads)
    elif args.qk_norm == "rms":
        attn += 2 * hd
    layer = attn + 3 * d * args.ffn_hidden + 2 * d
    total = args.n_layers * layer + d  # + final norm
    embed = args.vocab_size * d
    total += 0 if args.tie_embeddings else embed  # the output head
    return total + embed if embeddings else total


def flops_per_token(args: ModelArgs, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 2 per weight (embedding lookup excluded) + causal attention.

    Attention counts the causal half of the T x T scores (2 T D per layer forward, as kernels that
    skip masked blocks compute); training is 3x forward (backward = 2x forward).
    """
    d, hd = args.dim, args.head_dim
    per_layer = 2 * (
        d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d + 3 * d * args.ffn_hidden
    )
    per_layer += 2 * args.n_heads * hd * seq_len  # QK^T and AV over on average T/2 keys
    head = 2 * d * args.vocab_size
    fwd = args.n_layers * per_layer + head
    return float(3 * fwd if training else fwd)


def kv_cache_bytes_per_token(args: ModelArgs, bytes_per_value: int = 2) -> int:
    """KV-cache memory per token (all layers, keys and values)."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * bytes_per_value


def model_summary(args: ModelArgs, seq_len: int | None = None) -> str:
    """Human-readable shape, parameter count, FLOPs per token and memory of a config."""
    T = seq_len or args.max_seq_len
    n, n_body = count_params(args), count_params(args, embeddings=False)
    gib = 1024**3
    lines = [
        f"layers {args.n_layers}, dim {args.dim}, heads {args.n_heads} "
        f"(kv {args.n_kv_heads}, head_dim {args.head_dim}), "
        f"ffn {args.ffn_hidden}, vocab {args.vocab_size}, max_seq_len {args.max_seq_len}",
        f"qk_norm {args.qk_norm}, norm_order {args.norm_order}, tied output {'yes' if args.tie_embeddings else 'no'}, "
        f"dropout {args.dropout}, z_loss {args.z_loss:g}, rope_theta {args.rope_theta:g}",
        f"parameters: {n:,} ({n / 1e6:.1f}M; {n_body / 1e6:.1f}M without the input embedding)",
        f"FLOPs per token at sequence {T}: {_flops(flops_per_token(args, T, training=True))} training, "
        f"{_flops(flops_per_token(args, T, training=False))} forward",
        f"weights: {n * 2 / gib:.2f} GiB bf16, {n * 4 / gib:.2f} GiB fp32; "
        f"KV cache (bf16): {kv_cache_bytes_per_token(args) / 1024:.1f} KiB per token",
    ]
    return "\n".join(lines)


def _flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x >= 1e9 else f"{x / 1e6:.2f} MFLOP"
