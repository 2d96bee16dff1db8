"""interleaf <-> transformers' Chameleon: same logits, same VQ codes, bit-exact round trips."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chameleon_layouts import chameleon_tokenizer  # noqa: E402

import interleaf  # noqa: E402
from interleaf import cli  # noqa: E402
from interleaf.errors import InterleafError  # noqa: E402
from interleaf.model.convert import image_code_of, image_token_name, rope_from_hf, rope_to_hf  # noqa: E402
from interleaf.pipeline import read_weights  # noqa: E402

N_CODES = 64
VQ = dict(
    embed_dim=8,
    num_embeddings=N_CODES,
    latent_channels=8,
    resolution=16,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
)  # 16px -> 8x8 codes


def build_hf(path, swin: bool, tie: bool = False):
    """A randomly initialised tiny ChameleonForConditionalGeneration saved to `path`."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    tok = chameleon_tokenizer()
    cfg = ChameleonConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        swin_norm=swin,
        vq_config=VQ,
        vocabulary_map=tok.get_vocab(),
        tie_word_embeddings=tie,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # move every parameter off its init (norm weights of 1, biases of 0 hide layout bugs)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return hf


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """swin -> (HF model, directory with hf/ and il/, loaded interleaf pipeline), built once each."""
    cache = {}

    def get(swin: bool):
        if swin not in cache:
            root = tmp_path_factory.mktemp("swin" if swin else "prenorm")
            hf = build_hf(root / "hf", swin=swin)
            assert cli.main(["convert", "from-hf", str(root / "hf"), str(root / "il")]) == 0
            cache[swin] = (hf, root, interleaf.load(root / "il"))
        return cache[swin]

    return get


@pytest.fixture(params=[False, True], ids=["prenorm", "swin"])
def converted(request, conversions):
    return conversions(request.param)


@pytest.fixture
def prenorm(conversions):
    return conversions(False)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_same_logits_as_transformers(converted):
    hf, root, pipe = converted
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 48), generator=g)
    ids[:, 5:30] = torch.randint(4, 4 + N_CODES, (2, 25), generator=g)  # a run of image tokens
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
        masked = hf(input_ids=ids).logits  # transformers hides image ids from its logits
        ours = pipe.model(ids)
    assert relative_error(ours, ref) <= 1e-4
    text_cols = torch.ones(512, dtype=torch.bool)
    text_cols[4 : 4 + N_CODES] = False
    assert relative_error(ours[..., text_cols], masked[..., text_cols]) <= 1e-4
    # and the cache path of the converted model agrees too
    cache = pipe.model.setup_cache(2, 64)
    with torch.no_grad():
        step = torch.cat([pipe.model.decode(ids[:, :40], cache), pipe.model.decode(ids[:, 40:], cache)], 1)
    assert relative_error(step, ref) <= 1e-4


def test_same_vq_codes_and_image_ids(prenorm):
    hf, root, pipe = prenorm
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = hf.model.vqmodel.encode(x).image_tokens.view(3, 8, 8)
        codes = pipe.vqgan.encode(x)
        bpe = hf.model.get_image_tokens(x)
    assert codes.unique().numel() > 5  # a real comparison, not one code everywhere
    assert torch.equal(codes, want)
    assert torch.equal(pipe.vocab.code_to_id(codes).view(3, -1), bpe.long())
    with pytest.raises(InterleafError, match="no decoder"):
        pipe.vqgan.decode_code(codes)


def test_vocabulary_mapping(prenorm):
    hf, root, pipe = prenorm
    vocab = pipe.vocab
    mapping = hf.model.vocabulary_mapping
    assert {vocab.image_ids[c]: c for c in range(vocab.n_codes)} == mapping.bpe2img
    tok = json.loads((root / "hf" / "tokenizer.json").read_text())["model"]["vocab"]
    assert (vocab.bos_id, vocab.pad_id, vocab.eos_id) == (tok["<s>"], tok["<pad>"], tok["</s>"])
    assert (vocab.boi_id, vocab.eoi_id) == (tok["<racm3:break>"], tok["<eoss>"])
    assert vocab.image_grid == (8, 8) and vocab.size == 512
    assert not vocab.text_mask()[tok["<image>"]]


def test_to_hf_round_trip_is_bit_exact(converted, tmp_path):
    hf, root, _ = converted
    assert cli.main(["convert", "to-hf", str(root / "il"), str(tmp_path / "back")]) == 0
    a, b = read_weights(root / "hf"), read_weights(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (root / "hf" / name).read_bytes() or json.loads(
            (tmp_path / "back" / name).read_text()
        ) == json.loads((root / "hf" / name).read_text()), name
    from transformers import ChameleonForConditionalGeneration

    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_bfloat16_conversion_keeps_dtype_through_round_trip(prenorm, tmp_path):
    """--dtype casts the transformer only: the VQ-GAN keeps its float32 weights and runs in float32
    (a bfloat16 argmin picks other codes), also when the model is loaded in bfloat16."""
    hf, root, _ = prenorm
    from interleaf.model.convert import from_hf, to_hf

    assert cli.main(["convert", "from-hf", str(root / "hf"), str(tmp_path / "bf"), "--dtype", "bfloat16"]) == 0
    pipe = interleaf.load(tmp_path / "bf", dtype="bfloat16")
    assert pipe.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert {p.dtype for p in pipe.vqgan.parameters()} == {torch.float32}
    assert read_weights(tmp_path / "bf" / "vqgan" / "vqgan.safetensors")["quant_conv.weight"].dtype == torch.float32
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        want = hf.model.vqmodel.encode(x).image_tokens.view(4, 8, 8)
        assert torch.equal(pipe.vqgan.encode(x), want)
        hf_bf16 = hf.model.vqmodel.to(torch.bfloat16)
        try:  # negative control: the same encoder run in bfloat16 gives other codes
            assert not torch.equal(hf_bf16.encode(x.bfloat16()).image_tokens.view(4, 8, 8), want)
        finally:
            hf.model.vqmodel.float()
    to_hf(tmp_path / "bf", tmp_path / "bf-hf")
    assert json.loads((tmp_path / "bf-hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert cli.main(["convert", "from-hf", str(root / "hf"), str(tmp_path / "x"), "--dtype", "int8"]) == 2
    from_hf(tmp_path / "bf-hf", tmp_path / "bf2")
    to_hf(tmp_path / "bf2", tmp_path / "bf2-hf")
    a, b = read_weights(tmp_path / "bf-hf"), read_weights(tmp_path / "bf2-hf")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {str(a[k].dtype) for k in a if not k.startswith("model.vqmodel.")} == {"torch.bfloat16"}
    assert {str(a[k].dtype) for k in a if k.startswith("model.vqmodel.")} == {"torch.float32"}


def test_native_model_exports_to_transformers(tmp_path):
    """A model trained by interleaf (default vocabulary layout, own VQ-GAN) runs in transformers."""
    from transformers import ChameleonForConditionalGeneration

    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.text import train_bpe
    from interleaf.tokenizer.vocab import Vocabulary
    from interleaf.tokenizer.vqgan import VQConfig, VQModel

    text = train_bpe(["a red circle", "two blue squares"] * 5, vocab_size=300)
    vq = VQModel(
        VQConfig(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=32)
    )
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=32, image_grid=vq.grid)
    torch.manual_seed(3)
    model = Transformer(
        ModelArgs(
            dim=32,
            n_layers=2,
            n_heads=2,
            vocab_size=vocab.size,
            multiple_of=16,
            qk_norm="layernorm",
            tie_embeddings=True,
            max_seq_len=64,
        )
    ).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    save_model_dir(tmp_path / "il", model, vocab, text, vq)
    interleaf.model.convert.to_hf(tmp_path / "il", tmp_path / "hf")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.model.vocabulary_mapping.bpe2img == {vocab.image_ids[c]: c for c in range(32)}
    ids = torch.randint(0, vocab.size, (2, 30))
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
        assert relative_error(model(ids), ref) <= 1e-4
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.equal(hf.model.vqmodel.encode(x).image_tokens.view(2, 8, 8), vq.encode(x))
    with pytest.raises(InterleafError, match="per-head LayerNorm QK-norm"):
        bad = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=vocab.size, qk_norm="rms"))
        save_model_dir(tmp_path / "rms", bad, vocab, text)
        interleaf.model.convert.to_hf(tmp_path / "rms", tmp_path / "rms-hf")


def test_model_without_vqgan_keeps_its_image_grid_through_hf(tmp_path, capsys):
    """No VQ-GAN, 4x4 grid, 24 codes: to-hf says both in vq_config (transformers' defaults are 32x32
    and 8192), transformers reads them, and from-hf gives the same vocabulary and logits back."""
    from transformers import ChameleonForConditionalGeneration

    from interleaf.model.args import ModelArgs
    from interleaf.model.transformer import Transformer
    from interleaf.pipeline import save_model_dir
    from interleaf.tokenizer.text import train_bpe
    from interleaf.tokenizer.vocab import Vocabulary

    text = train_bpe(["a red circle", "two blue squares"] * 5, vocab_size=300)
    vocab = Vocabulary.build(n_text=text.vocab_size, n_codes=24, image_grid=(4, 4))
    torch.manual_seed(5)
    model = Transformer(
        ModelArgs(
            dim=32, n_layers=1, n_heads=2, vocab_size=vocab.size, multiple_of=16, qk_norm="layernorm", max_seq_len=64
        )
    ).eval()
    save_model_dir(tmp_path / "il", model, vocab, text)
    assert cli.main(["convert", "to-hf", str(tmp_path / "il"), str(tmp_path / "hf")]) == 0
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vq_config.resolution == 64 and hf.config.vq_config.num_embeddings == 24
    assert hf.model.vocabulary_mapping.bpe2img == {vocab.image_ids[c]: c for c in range(24)}
    assert cli.main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = interleaf.load(tmp_path / "back")
    assert back.vqgan is None and back.vocab.image_grid == (4, 4) and back.vocab.image_ids == vocab.image_ids
    ids = torch.randint(0, vocab.size, (2, 20))
    with torch.no_grad():
        assert torch.equal(back.model(ids), model(ids))

    wide = Vocabulary.build(n_text=text.vocab_size, n_codes=24, image_grid=(2, 8))
    save_model_dir(tmp_path / "wide", model, wide, text)
    assert cli.main(["convert", "to-hf", str(tmp_path / "wide"), str(tmp_path / "wide-hf")]) == 2
    assert "image grid is 2x8, but the HF Chameleon format holds only square grids" in capsys.readouterr().err
    assert not (tmp_path / "wide-hf").exists()


def test_rope_permutation_matches_hf_conversion_script():
    w = torch.randn(4 * 8, 5)  # 4 heads of head_dim 8
    # Meta -> HF, as transformers' convert_chameleon_weights_to_hf.py writes it
    hf_permute = w.view(4, 8 // 2, 2, 5).transpose(1, 2).reshape(32, 5)
    assert torch.equal(rope_to_hf(w, 4, 8), hf_permute)
    assert torch.equal(rope_from_hf(hf_permute, 4, 8), w)
    norm = torch.randn(4, 8)
    assert torch.equal(rope_to_hf(rope_from_hf(norm, 4, 8), 4, 8), norm)
    assert torch.equal(rope_to_hf(norm, 4, 8)[1], norm[1].view(4, 2).t().reshape(8))


def test_image_token_names():
    assert image_token_name(12) == "IMGIMGBCZ" and image_code_of("IMGIMGBCZ") == 12
    assert image_code_of("IMGIMGAZ") == 0 and image_code_of("<image>") is None
    assert all(image_code_of(image_token_name(c)) == c for c in range(0, 9000, 97))


def test_mismatched_checkpoints_fail_clearly(prenorm, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    _, root, _ = prenorm
    src = tmp_path / "bad"
    shutil.copytree(root / "hf", src)
    state = read_weights(src)

    def convert():
        return cli.main(["convert", "from-hf", str(src), str(tmp_path / "out")])

    broken = dict(state)
    del broken["model.layers.1.self_attn.k_norm.bias"]
    save_file(broken, str(src / "model.safetensors"))
    assert convert() == 2
    assert "missing tensor model.layers.1.self_attn.k_norm.bias" in capsys.readouterr().err
    broken = dict(state, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)})
    save_file(broken, str(src / "model.safetensors"))
    assert convert() == 2
    assert (
        "model.layers.0.mlp.up_proj.weight has shape (95, 64), config.json implies (96, 64)" in capsys.readouterr().err
    )
    save_file(dict(state, **{"model.layers.7.extra": torch.zeros(1)}), str(src / "model.safetensors"))
    assert convert() == 2
    assert "unexpected tensor model.layers.7.extra" in capsys.readouterr().err
    save_file(state, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    assert convert() == 2
    assert "model_type is 'llama', expected 'chameleon'" in capsys.readouterr().err
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer.json").unlink()
    assert convert() == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert cli.main(["convert", "to-hf", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "not an interleaf model directory" in capsys.readouterr().err


def test_malformed_sources_and_used_destinations_fail_clearly(prenorm, tmp_path, capsys):
    import shutil

    _, root, _ = prenorm
    src = tmp_path / "src"
    shutil.copytree(root / "hf", src)
    cfg = json.loads((src / "config.json").read_text())

    def fails(argv, message):
        assert cli.main(["convert", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err

    for text, message in [
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps(dict(cfg, hidden_size="abc")), "config.json:"),
        (json.dumps(dict(cfg, hidden_size=None)), "config.json:"),
        (json.dumps(dict(cfg, vocabulary_map=5)), "vocabulary_map is not a token table"),
    ]:
        (src / "config.json").write_text(text)
        fails(["from-hf", src, tmp_path / "out"], message)
    (src / "config.json").write_bytes(b"\xff\xfe{}")
    fails(["from-hf", src, tmp_path / "out"], "not a UTF-8 text file")
    (src / "config.json").write_text(json.dumps(cfg))
    assert not (tmp_path / "out").exists()

    # a destination holding other files is refused (no silent mix); an empty one is filled, an
    # earlier from-hf output replaced; to-hf never replaces an HF folder (it cannot tell who wrote it)
    used = tmp_path / "used"
    shutil.copytree(root / "il", used)
    (used / "notes.txt").write_text("mine")
    shutil.rmtree(used / "hf")
    fails(["from-hf", src, used], "is not empty nor an earlier from-hf output")
    assert (used / "notes.txt").is_file()
    (tmp_path / "empty").mkdir()
    assert cli.main(["convert", "from-hf", str(src), str(tmp_path / "empty")]) == 0
    (tmp_path / "empty" / "stale.txt").write_text("from before")
    assert cli.main(["convert", "from-hf", str(src), str(tmp_path / "empty"), "--dtype", "bfloat16"]) == 0
    assert not (tmp_path / "empty" / "stale.txt").exists()
    assert interleaf.load(tmp_path / "empty").model.tok_embeddings.weight.dtype == torch.bfloat16
    fails(["to-hf", root / "il", src], "is not empty: choose")
    (tmp_path / "afile").write_text("")
    fails(["to-hf", root / "il", tmp_path / "afile"], "exists and is not a folder")
    fails(["to-hf", root / "il", "/proc/interleaf-hf"], "cannot write in /proc")

    # to-hf of a directory whose weights are gone or cut short
    (used / "model.safetensors").write_bytes((used / "model.safetensors").read_bytes()[:100])
    fails(["to-hf", used, tmp_path / "back"], "cannot read")
    (used / "model.safetensors").unlink()
    fails(["to-hf", used, tmp_path / "back"], "has no model.safetensors")
    assert not (tmp_path / "back").exists() and not list(tmp_path.glob(".tmp-*"))


# ---- a transformers folder that carries the VQ decoder (community conversions of Anole) --------
def taming_decoder(vq: dict):
    """taming-transformers' own Decoder for an HF vq_config (the reference for decoded pixels)."""
    decoder = pytest.importorskip("taming.modules.diffusionmodules.model", reason="installed by make setup").Decoder
    return decoder(
        ch=vq["base_channels"],
        out_ch=3,
        ch_mult=vq["channel_multiplier"],
        num_res_blocks=vq["num_res_blocks"],
        attn_resolutions=[],
        in_channels=3,
        resolution=vq["resolution"],
        z_channels=vq["latent_channels"],
    ).eval()


@pytest.fixture(scope="module")
def with_decoder(tmp_path_factory):
    """An HF Chameleon folder whose safetensors add model.vqmodel.decoder.*, converted with from-hf."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("decoder")
    hf = build_hf(root / "hf", swin=False)
    torch.manual_seed(7)
    decoder = taming_decoder(VQ)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tensors = read_weights(root / "hf")
    tensors.update({f"model.vqmodel.decoder.{k}": v for k, v in decoder.state_dict().items()})
    save_file(tensors, str(root / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["convert", "from-hf", str(root / "hf"), str(root / "il")]) == 0
    return hf, decoder, root


def test_from_hf_keeps_the_vq_decoder_and_decodes_as_taming(with_decoder):
    hf, decoder, root = with_decoder
    pipe = interleaf.load(root / "il")
    assert pipe.vqgan.config.has_decoder
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        codes = hf.model.vqmodel.encode(x).image_tokens.view(3, 8, 8)
        assert torch.equal(pipe.vqgan.encode(x), codes)
        vq = hf.model.vqmodel
        z_q = vq.quantize.embedding(codes).permute(0, 3, 1, 2)  # (B, embed_dim, h, w)
        want = decoder(vq.post_quant_conv(z_q)).clamp(-1, 1)
        got = pipe.vqgan.decode_code(codes)
    assert got.shape == (3, 3, 16, 16) and want.std() > 0.05  # a real image, not a constant
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # float32 summation order


def test_to_hf_round_trip_with_a_decoder_is_bit_exact(with_decoder, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    hf, _, root = with_decoder
    assert cli.main(["convert", "to-hf", str(root / "il"), str(tmp_path / "back")]) == 0
    a, b = read_weights(root / "hf"), read_weights(tmp_path / "back")
    assert any(k.startswith("model.vqmodel.decoder.") for k in b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "back").eval()  # decoder keys ignored
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, hf(input_ids=ids).logits)
