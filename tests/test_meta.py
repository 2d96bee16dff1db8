"""`interleaf convert from-meta`: Meta's Chameleon / Anole release layout -> model directory.

References: transformers' own conversion of this layout (convert_chameleon_weights_to_hf.py, whose
state-dict logic `hf_from_meta` transcribes) loaded in `ChameleonForConditionalGeneration` for the
logits; transformers' `ChameleonVQVAE` for the codes; taming-transformers' own `Decoder` for the pixels.
"""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("taming.modules.diffusionmodules.model", reason="installed by make setup")

from chameleon_layouts import SPLIT, TINY_VQ, write_meta_release  # noqa: E402

import interleaf  # noqa: E402
from interleaf import cli  # noqa: E402
from interleaf.model.convert import CHAMELEON_SAMPLING  # noqa: E402
from interleaf.pipeline import read_sampling_defaults, read_weights  # noqa: E402


def hf_from_meta(input_base_path, params, vq_state, num_shards):
    """transformers' convert_chameleon_weights_to_hf.py `write_model`, its state-dict and config part
    transcribed (same names, same operations), on a release written by `write_meta_release`."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    input_model_path = input_base_path / "models" / "7b"
    n_layers, n_heads, dim = params["n_layers"], params["n_heads"], params["dim"]
    n_heads_per_shard = n_heads // num_shards
    dims_per_head = dim // n_heads
    num_key_value_heads, key_value_dim = n_heads, dim  # Chameleon's params.json has no n_kv_heads
    num_local_key_value_heads = n_heads_per_shard
    if num_shards == 1:
        loaded = torch.load(input_model_path / "consolidated.pth", map_location="cpu", weights_only=True)
    else:
        loaded = [
            torch.load(input_model_path / f"consolidated.{i:02d}.pth", map_location="cpu", weights_only=True)
            for i in range(num_shards)
        ]

    def permute(w, n_heads, dim1=dim, dim2=dim):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    state_dict = {}
    for layer_i in range(n_layers):
        p, q = f"layers.{layer_i}.", f"model.layers.{layer_i}."
        if num_shards == 1:
            state_dict.update(
                {
                    q + "self_attn.q_proj.weight": permute(loaded[p + "attention.wq.weight"], n_heads=n_heads),
                    q + "self_attn.k_proj.weight": permute(
                        loaded[p + "attention.wk.weight"], n_heads=num_key_value_heads, dim1=key_value_dim
                    ),
                    q + "self_attn.v_proj.weight": loaded[p + "attention.wv.weight"],
                    q + "self_attn.o_proj.weight": loaded[p + "attention.wo.weight"],
                    q + "mlp.gate_proj.weight": loaded[p + "feed_forward.w1.weight"],
                    q + "mlp.down_proj.weight": loaded[p + "feed_forward.w2.weight"],
                    q + "mlp.up_proj.weight": loaded[p + "feed_forward.w3.weight"],
                    q + "input_layernorm.weight": loaded[p + "attention_norm.weight"],
                    q + "post_attention_layernorm.weight": loaded[p + "ffn_norm.weight"],
                }
            )
            for which, heads in (("q", n_heads), ("k", num_key_value_heads)):
                for part in ("weight", "bias"):
                    state_dict[q + f"self_attn.{which}_norm.{part}"] = (
                        loaded[p + f"attention.{which}_normalization.{part}"]
                        .view(dims_per_head // 2, 2)
                        .t()
                        .reshape(1, -1)
                        .repeat_interleave(heads, 0)
                    )
        else:
            state_dict[q + "input_layernorm.weight"] = torch.stack(
                [ld[p + "attention_norm.weight"] for ld in loaded]
            ).mean(dim=0)
            state_dict[q + "post_attention_layernorm.weight"] = torch.stack(
                [ld[p + "ffn_norm.weight"] for ld in loaded]
            ).mean(dim=0)
            state_dict[q + "self_attn.q_proj.weight"] = permute(
                torch.cat(
                    [
                        loaded[i][p + "attention.wq.weight"].view(n_heads_per_shard, dims_per_head, dim)
                        for i in range(num_shards)
                    ],
                    dim=0,
                ).reshape(dim, dim),
                n_heads=n_heads,
            )
            state_dict[q + "self_attn.k_proj.weight"] = permute(
                torch.cat(
                    [
                        loaded[i][p + "attention.wk.weight"].view(num_local_key_value_heads, dims_per_head, dim)
                        for i in range(num_shards)
                    ],
                    dim=0,
                ).reshape(key_value_dim, dim),
                n_heads=num_key_value_heads,
                dim1=key_value_dim,
            )
            for which, heads in (("q", n_heads), ("k", num_key_value_heads)):
                for part in ("weight", "bias"):
                    state_dict[q + f"self_attn.{which}_norm.{part}"] = (
                        torch.cat([ld[p + f"attention.{which}_normalization.{part}"].unsqueeze(0) for ld in loaded])
                        .view(num_shards, dims_per_head // 2, 2)
                        .transpose(1, 2)
                        .reshape(num_shards, -1)
                        .repeat_interleave(heads // num_shards, 0)
                    )
            state_dict[q + "self_attn.v_proj.weight"] = torch.cat(
                [
                    loaded[i][p + "attention.wv.weight"].view(num_local_key_value_heads, dims_per_head, dim)
                    for i in range(num_shards)
                ],
                dim=0,
            ).reshape(key_value_dim, dim)
            state_dict[q + "self_attn.o_proj.weight"] = torch.cat(
                [loaded[i][p + "attention.wo.weight"] for i in range(num_shards)], dim=1
            )
            state_dict[q + "mlp.gate_proj.weight"] = torch.cat(
                [loaded[i][p + "feed_forward.w1.weight"] for i in range(num_shards)], dim=0
            )
            state_dict[q + "mlp.down_proj.weight"] = torch.cat(
                [loaded[i][p + "feed_forward.w2.weight"] for i in range(num_shards)], dim=1
            )
            state_dict[q + "mlp.up_proj.weight"] = torch.cat(
                [loaded[i][p + "feed_forward.w3.weight"] for i in range(num_shards)], dim=0
            )
    if num_shards == 1:
        state_dict.update(
            {
                "model.embed_tokens.weight": loaded["tok_embeddings.weight"],
                "model.norm.weight": loaded["norm.weight"],
                "lm_head.weight": loaded["output.weight"],
            }
        )
    else:
        state_dict.update(
            {
                "model.embed_tokens.weight": torch.cat(
                    [loaded[i]["tok_embeddings.weight"] for i in range(num_shards)], dim=1
                ),
                "model.norm.weight": torch.stack([loaded[i]["norm.weight"] for i in range(num_shards)]).mean(dim=0),
                "lm_head.weight": torch.cat([loaded[i]["output.weight"] for i in range(num_shards)], dim=0),
            }
        )
    vqgan_state_dict = torch.load(input_base_path / "tokenizer" / "vqgan.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    for k, v in vqgan_state_dict.items():
        if "decoder" in k:
            continue  # transformers' format keeps no decoder
        state_dict[f"model.vqmodel.{k}"] = v
    tokenizer_config = json.loads((input_base_path / "tokenizer" / "text_tokenizer.json").read_text())
    vocabulary_map = tokenizer_config["model"]["vocab"]
    vocabulary_map["<image>"] = vocabulary_map.pop("<reserved08707>")
    vq_config = yaml_params(input_base_path)
    vq_config.update(**vq_config.pop("ddconfig"))
    renames = [("ch", "base_channels"), ("out_ch", "out_channels"), ("n_embed", "num_embeddings")]
    renames += [("ch_mult", "channel_multiplier"), ("double_z", "double_latent"), ("z_channels", "latent_channels")]
    for old, new in renames:
        vq_config[new] = vq_config[old]
    del vq_config["lossconfig"]
    m = params["multiple_of"]
    config = ChameleonConfig(
        hidden_size=dim,
        intermediate_size=m * ((int(1 * int(8 * dim / 3)) + m - 1) // m),
        num_attention_heads=n_heads,
        num_hidden_layers=n_layers,
        rms_norm_eps=params["norm_eps"],
        num_key_value_heads=num_key_value_heads,
        vocab_size=params["vocab_size"],
        rope_theta=params["rope_theta"],
        max_position_embeddings=4096,
        model_parallel_size=num_shards,
        swin_norm=params["swin_norm"],
        vq_config=vq_config,
        vocabulary_map=vocabulary_map,
    )
    model = ChameleonForConditionalGeneration(config)  # the script builds it on "meta", saves and reloads
    result = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    assert result.missing_keys == [] and all(k.startswith("model.vqmodel.loss.") for k in result.unexpected_keys)
    return model.eval()


def yaml_params(root):
    import yaml

    return yaml.safe_load((root / "tokenizer" / "vqgan.yaml").read_text())["model"]["params"]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """mp -> (release root, what was written, converted model directory), built once each."""
    cache = {}

    def get(mp: int, **kw):
        key = (mp, tuple(sorted(kw.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"release-mp{mp}")
            written = write_meta_release(root / "src", mp=mp, **kw)
            assert cli.main(["convert", "from-meta", str(root / "src"), str(root / "out")]) == 0
            cache[key] = (root / "src", written, root / "out")
        return cache[key]

    return get


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_logits_equal_transformers_conversion(releases, mp):
    src, written, out = releases(mp)
    hf = hf_from_meta(src, written["model"], written["vq_state"], mp)
    pipe = interleaf.load(out, dtype="float32")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(mp))
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
        ours = pipe.model(ids)
    assert ref.std() > 0.1  # logits spread out: a comparison that could fail
    assert relative_error(ours, ref) <= 1e-5
    # the q/k norms of heads in different shards differ: the expansion was per shard, not one copy
    if mp > 1:
        w = pipe.model.layers[0].attention.q_norm.weight
        assert not torch.equal(w[0], w[-1]) and torch.equal(w[0], w[4 // mp - 1])


def test_shards_and_one_file_give_the_same_weights(tmp_path):
    """GQA (8 heads, 4 key/value heads) in 2 and 4 shards converts to exactly the weights the
    unsharded release gives (transformers' converter cannot read sharded GQA; this is the check)."""
    got = {}
    for mp in (1, 2, 4):
        write_meta_release(tmp_path / f"r{mp}", mp=mp, n_heads=8, n_kv_heads=4, dim=64)
        assert cli.main(["convert", "from-meta", str(tmp_path / f"r{mp}"), str(tmp_path / f"o{mp}")]) == 0
        got[mp] = read_weights(tmp_path / f"o{mp}")
    for mp in (2, 4):
        assert sorted(got[mp]) == sorted(got[1])
        diff = [k for k in got[1] if not torch.equal(got[mp][k], got[1][k])]
        assert diff == [k for k in diff if "_norm." in k and "attention." in k]  # only the per-shard q/k norms
    k = got[4]["layers.1.attention.k_norm.bias"]  # (4 kv heads, 8): one per shard
    assert len({tuple(r.tolist()) for r in k}) == 4


def test_vq_codes_and_pixels_equal_references(releases):
    from taming.modules.diffusionmodules.model import Decoder

    src, written, out = releases(1)
    hf = hf_from_meta(src, written["model"], written["vq_state"], 1)
    pipe = interleaf.load(out, dtype="bfloat16")
    assert pipe.vqgan.config.has_decoder and {p.dtype for p in pipe.vqgan.parameters()} == {torch.float32}
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    decoder = Decoder(**written["ddconfig"]).eval()
    state = written["vq_state"]
    decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
    with torch.no_grad():
        codes = hf.model.vqmodel.encode(x).image_tokens.view(4, 8, 8)
        assert codes.unique().numel() > 8 and torch.equal(pipe.vqgan.encode(x), codes)
        z_q = state["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)  # (B, embed_dim, h, w)
        post = torch.nn.functional.conv2d(z_q, state["post_quant_conv.weight"], state["post_quant_conv.bias"])
        want = decoder(post).clamp(-1, 1)
        got = pipe.vqgan.decode_code(codes)
    assert want.std() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_output_directory(releases, tmp_path):
    src, written, out = releases(2)
    assert read_sampling_defaults(out) == CHAMELEON_SAMPLING
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (
        src / "tokenizer" / "text_tokenizer.json"
    ).read_bytes()
    for name in ("params.json", "consolidate_params.json", "vqgan.yaml"):
        assert (out / "meta" / name).is_file()
    weights = read_weights(out)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}  # as stored
    assert read_weights(out / "vqgan" / "vqgan.safetensors")["decoder.conv_out.weight"].dtype == torch.float32
    pipe = interleaf.load(out)
    vocab, table = pipe.vocab, written["vocab"]
    assert (vocab.boi_id, vocab.eoi_id, vocab.bos_id) == (table["<racm3:break>"], table["<eoss>"], table["<s>"])
    assert vocab.image_ids[12] == table["IMGIMGBCZ"] and vocab.image_grid == (8, 8) and vocab.n_codes == 64
    # --dtype, and the model folder with --tokenizer (or found two levels up) instead of the release folder
    argv = ["convert", "from-meta", str(src / "models" / "7b"), str(tmp_path / "f32"), "--dtype", "fp32"]
    assert cli.main(argv + ["--tokenizer", str(src / "tokenizer")]) == 0
    assert {v.dtype for v in read_weights(tmp_path / "f32").values()} == {torch.float32}
    assert all(torch.equal(read_weights(tmp_path / "f32")[k], v.float()) for k, v in weights.items())
    assert cli.main(argv) == 0  # replaces its own earlier output
    assert cli.main(["info", str(out)]) == 0


def test_generation_runs_from_the_converted_directory(releases, tmp_path, capsys):
    """Draw, caption and interleaved generation, end to end through the CLI with Chameleon's sampling
    settings, each prompt ending its turn as Anole's scripts and transformers' processor do."""
    src, written, out = releases(1, boi_bias=True)
    assert read_sampling_defaults(out) == CHAMELEON_SAMPLING
    assert cli.main(["draw", str(out), "a red circle<eot>", "--out", str(tmp_path / "draw"), "--seed", "1"]) == 0
    pngs = sorted((tmp_path / "draw").glob("*.png"))
    assert len(pngs) == 1 and (tmp_path / "draw" / "document.md").is_file()
    from PIL import Image

    assert Image.open(pngs[0]).size == (16, 16)
    argv = ["caption", str(out), str(pngs[0]), "--prompt", "What is this?<eot>", "--max-new-tokens", "6"]
    argv += ["--out", str(tmp_path / "cap")]
    assert cli.main(argv) == 0
    assert (tmp_path / "cap" / "document.md").read_text().strip()
    argv = ["generate", str(out), "--prompt", "<image>the quick brown fox<eot>", "--image", str(pngs[0])]
    argv += ["--mode", "interleaved"]
    argv += ["--max-new-tokens", "80", "--out", str(tmp_path / "doc")]
    assert cli.main(argv) == 0
    assert len(list((tmp_path / "doc").glob("image-*.png"))) == 1  # the model opened an image and it was drawn


# ---- bad input: one clear line, exit 2, nothing written -----------------------------------------
def fails(capsys, tmp_path, src, message, *extra):
    assert cli.main(["convert", "from-meta", str(src), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_bad_releases_fail_clearly(tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    write_meta_release(src, mp=4)
    mdir = src / "models" / "7b"
    os.rename(mdir / "consolidated.02.pth", tmp_path / "kept.pth")
    fails(capsys, tmp_path, src, "has no consolidated.02.pth (model-parallel shard 3 of 4)")

    other = tmp_path / "other"  # a shard of another model of the same shape: its replicated norms differ
    write_meta_release(other, mp=4, seed=5)
    shutil.copy(other / "models" / "7b" / "consolidated.02.pth", mdir / "consolidated.02.pth")
    fails(capsys, tmp_path, src, "consolidated.00.pth and consolidated.02.pth are not shards of one model")
    bigger = tmp_path / "bigger"  # ... or of another shape
    write_meta_release(bigger, mp=4, dim=128, n_heads=8)
    shutil.copy(bigger / "models" / "7b" / "consolidated.02.pth", mdir / "consolidated.02.pth")
    fails(
        capsys,
        tmp_path,
        src,
        "not shards of one model: tok_embeddings.weight is (512, 16) in one, (512, 32) in the other",
    )
    os.rename(tmp_path / "kept.pth", mdir / "consolidated.02.pth")

    params = json.loads((mdir / "params.json").read_text())
    params["model"]["n_layers"] = 3
    (mdir / "params.json").write_text(json.dumps(params))
    fails(capsys, tmp_path, src, "missing tensor layers.2.attention.wq.weight")
    params["model"].update(n_layers=2, multiple_of=128)
    (mdir / "params.json").write_text(json.dumps(params))
    fails(capsys, tmp_path, src, "tensor layers.0.feed_forward.w1.weight has shape (48, 64), params.json + ")
    params["model"]["multiple_of"] = 32
    (mdir / "params.json").write_text(json.dumps(params))

    class Payload:
        def __reduce__(self):
            return (print, ("a pickle runs code",))

    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, mdir / "consolidated.01.pth")
    fails(capsys, tmp_path, src, "holds pickled objects other than tensors, refused")
    (mdir / "consolidated.01.pth").write_bytes(b"not a checkpoint")
    fails(capsys, tmp_path, src, "consolidated.01.pth: not a checkpoint in torch.save's zip format")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"double_z": True}, "ddconfig.double_z other than False is not supported"),
        ({"attn_type": "linear"}, "ddconfig.attn_type 'linear' is not supported"),
        ({"ch": 48}, "not divisible by model.norm_groups=32"),
        ({"resolution": 17}, "must be a positive multiple of the downsampling factor 2"),
        ({"z_dim": 3}, "unknown config key 'model.params.z_dim'"),
    ],
)
def test_vq_configs_this_vqgan_cannot_build_fail_clearly(tmp_path, capsys, change, message):
    import yaml

    src = tmp_path / "src"
    write_meta_release(src)
    path = src / "tokenizer" / "vqgan.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["params"]["ddconfig"].update(change)
    path.write_text(yaml.safe_dump(cfg))
    fails(capsys, tmp_path, src, message)


def test_lightning_checkpoint_must_match_its_config(tmp_path, capsys):
    src = tmp_path / "src"
    write_meta_release(src, vq={**TINY_VQ, "n_embed": 32})
    import yaml

    path = src / "tokenizer" / "vqgan.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["params"]["n_embed"] = 64
    path.write_text(yaml.safe_dump(cfg))
    fails(capsys, tmp_path, src, "quantize.embedding.weight")
    assert SPLIT["output.weight"] == 0  # the layout table the fixtures follow
