"""Small random checkpoints written in the published Chameleon layouts (shared by tests and bench).

`write_meta_release` writes Meta's release folder (Anole-7b-v0.1 ships in the same layout) as Meta's
code reads it: models/7b/params.json + consolidate_params.json, consolidated.pth or model-parallel
shards consolidated.0N.pth (each tensor sliced along the dimension Meta's model-parallel layers
split; norms replicated; one q/k LayerNorm of head_dim per shard; rope.freqs carried along), and
tokenizer/text_tokenizer.json, vqgan.yaml and a Lightning vqgan.ckpt whose VQ-GAN weights come from
taming-transformers' own Encoder and Decoder modules (plus loss.* discriminator tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from interleaf.model.convert import image_token_name

# how Meta's model-parallel layers slice each tensor: the dimension, or None (replicated)
SPLIT = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "norm.weight": None,
}
TINY_VQ = dict(embed_dim=8, n_embed=64, z_channels=8, resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1)
TEXTS = ("a red circle above a blue square", "the quick brown fox")
RELEASE_SPECIALS = ("<reserved08706>", "<reserved08707>")  # Meta's end of a turn, and one more reserved name


def chameleon_tokenizer(n_codes: int = 64, extra=("<image>",), vocab_size: int = 400, texts=TEXTS):
    """A byte-level BPE laid out like Chameleon's: <s> <pad> </s> <unk>, IMGIMG codes, <eoss> <racm3:break>, extras,
    then pieces learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(n_codes)]
    specials += ["<eoss>", "<racm3:break>", *extra]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts) * 10, trainer)
    return tok


def meta_params(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=512, multiple_of=32, swin_norm=False, **extra
) -> dict:
    """The model fields of a params.json (Meta's ModelArgs names)."""
    model = dict(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        vocab_size=vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=10000.0,
        qk_normalization=True,
        swin_norm=swin_norm,
        **extra,
    )
    if n_kv_heads is not None:
        model["n_kv_heads"] = n_kv_heads
    return model


def random_weights(model: dict, mp: int, seed: int = 0, dtype=torch.bfloat16, scale: float = 0.1):
    """Whole tensors under Meta's names (the same for any `mp`) and the per-shard q/k norms.

    Returns (full, qk): full[name] is the whole tensor; qk[name] a list of `mp` (head_dim,) tensors.
    """
    g = torch.Generator().manual_seed(seed)
    dim, heads = model["dim"], model["n_heads"]
    kv, hd = model.get("n_kv_heads") or heads, model["dim"] // model["n_heads"]
    hidden = int(2 * 4 * dim / 3)
    if model.get("ffn_dim_multiplier") is not None:
        hidden = int(model["ffn_dim_multiplier"] * hidden)
    m = model["multiple_of"]
    hidden = m * ((hidden + m - 1) // m)

    g_qk = torch.Generator().manual_seed(seed + 1)  # its own stream: `full` does not depend on `mp`

    def rnd(*shape, mean=0.0, gen=g):
        return (mean + scale * torch.randn(*shape, generator=gen)).to(dtype)

    full = {"tok_embeddings.weight": rnd(model["vocab_size"], dim), "norm.weight": rnd(dim, mean=1.0)}
    qk = {}
    for i in range(model["n_layers"]):
        p = f"layers.{i}."
        full.update(
            {
                p + "attention.wq.weight": rnd(heads * hd, dim),
                p + "attention.wk.weight": rnd(kv * hd, dim),
                p + "attention.wv.weight": rnd(kv * hd, dim),
                p + "attention.wo.weight": rnd(dim, heads * hd),
                p + "feed_forward.w1.weight": rnd(hidden, dim),
                p + "feed_forward.w2.weight": rnd(dim, hidden),
                p + "feed_forward.w3.weight": rnd(hidden, dim),
                p + "attention_norm.weight": rnd(dim, mean=1.0),
                p + "ffn_norm.weight": rnd(dim, mean=1.0),
            }
        )
        for which in ("q", "k"):
            qk[p + f"attention.{which}_normalization.weight"] = [rnd(hd, mean=1.0, gen=g_qk) for _ in range(mp)]
            qk[p + f"attention.{which}_normalization.bias"] = [rnd(hd, gen=g_qk) for _ in range(mp)]
    full["output.weight"] = rnd(model["vocab_size"], dim)
    return full, qk


def shard_state(full: dict, qk: dict, mp: int, rank: int, head_dim: int) -> dict:
    """What Meta's model-parallel rank `rank` of `mp` holds."""
    out = {}
    for name, t in full.items():
        split = SPLIT[name.split(".", 2)[2] if name.startswith("layers.") else name]
        out[name] = t.clone() if split is None else t.chunk(mp, dim=split)[rank].clone()
    for name, per_shard in qk.items():
        out[name] = per_shard[rank].clone()
    out["rope.freqs"] = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return out


def taming_vqgan(vq: dict = TINY_VQ, seed: int = 0):
    """taming-transformers' Encoder and Decoder (+ quant convs and codebook) for a vqgan.yaml's params,
    every weight moved off its initial value; returns (ddconfig, state dict with taming's names)."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    dd = dict(
        double_z=False,
        z_channels=vq["z_channels"],
        resolution=vq["resolution"],
        in_channels=3,
        out_ch=3,
        ch=vq["ch"],
        ch_mult=list(vq["ch_mult"]),
        num_res_blocks=vq["num_res_blocks"],
        attn_resolutions=[],
        dropout=0.0,
    )
    torch.manual_seed(seed)
    modules = {
        "encoder": Encoder(**dd),
        "decoder": Decoder(**dd),
        "quant_conv": torch.nn.Conv2d(vq["z_channels"], vq["embed_dim"], 1),
        "post_quant_conv": torch.nn.Conv2d(vq["embed_dim"], vq["z_channels"], 1),
        "quantize": torch.nn.Module(),
    }
    modules["quantize"].embedding = torch.nn.Embedding(vq["n_embed"], vq["embed_dim"])
    state = {}
    with torch.no_grad():
        for prefix, module in modules.items():
            for k, v in module.state_dict().items():
                state[f"{prefix}.{k}"] = v + 0.05 * torch.randn_like(v)
    return dd, state


def write_meta_release(
    root: Path,
    mp: int = 1,
    seed: int = 0,
    dtype=torch.bfloat16,
    vq: dict = TINY_VQ,
    boi_bias: bool = False,
    specials=RELEASE_SPECIALS,
    texts=TEXTS,
    **model_kw,
) -> dict:
    """Write a random release under `root` (models/7b, tokenizer/); returns what a test compares against:
    {"model": params' model fields, "full": whole tensors, "qk": per-shard q/k norms, "vq_state": VQ-GAN
    weights (taming names), "ddconfig": ..., "vocab": token -> id}.

    boi_bias: a hidden channel every token embedding holds large, read only by the output row of
    <racm3:break> (<boi>), so that a random model opens images by itself (for interleaved generation).
    specials, texts: the tokenizer's extra special names and the texts its BPE pieces are learned from.
    """
    model = meta_params(**model_kw)
    full, qk = random_weights(model, mp, seed, dtype)
    tok = chameleon_tokenizer(vq["n_embed"], extra=specials, texts=texts)
    vocab = tok.get_vocab()
    if boi_bias:
        full["tok_embeddings.weight"][:, 0] = 4.0
        full["output.weight"][:, 0] = 0.0
        full["output.weight"][vocab["<racm3:break>"], 0] = 3.0
    mdir = root / "models" / "7b"
    mdir.mkdir(parents=True)
    # the consolidated checkpoint's parallelism is in consolidate_params.json, over the training run's
    (mdir / "params.json").write_text(json.dumps({"model": model, "model_parallel_size": 8, "seed": 1}))
    (mdir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": mp}))
    head_dim = model["dim"] // model["n_heads"]
    for rank in range(mp):
        name = "consolidated.pth" if mp == 1 else f"consolidated.{rank:02d}.pth"
        torch.save(shard_state(full, qk, mp, rank, head_dim), mdir / name)
    tdir = root / "tokenizer"
    tdir.mkdir()
    tok.save(str(tdir / "text_tokenizer.json"))
    dd, vq_state = taming_vqgan(vq, seed)
    params = dict(
        embed_dim=vq["embed_dim"],
        n_embed=vq["n_embed"],
        ddconfig=dd,
        lossconfig=dict(target="taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", params={}),
    )
    cfg = dict(model=dict(base_learning_rate=4.5e-6, target="taming.models.vqgan.VQModel", params=params))
    (tdir / "vqgan.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    loss = {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4), "loss.logvar": torch.zeros(())}
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": {**vq_state, **loss}}
    torch.save(ckpt, tdir / "vqgan.ckpt")
    return dict(model=model, full=full, qk=qk, vq_state=vq_state, ddconfig=dd, vocab=vocab)
