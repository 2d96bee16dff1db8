"""VQ-GAN model, quantizer, image IO and checkpoint interop (tiny CPU shapes)."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.errors import InterleafError
from interleaf.tokenizer.image import list_images, load_image, to_pil
from interleaf.tokenizer.losses import LPIPS, NLayerDiscriminator, adaptive_weight, hinge_d_loss, load_lpips
from interleaf.tokenizer.quantize import VectorQuantizer
from interleaf.tokenizer.vqgan import (
    VQConfig,
    VQModel,
    code_stats,
    convert_hf_vq_state_dict,
    hf_vq_tensors,
    psnr,
    vq_config_from_hf,
)

TINY = dict(
    resolution=32,
    ch=16,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[16],
    z_channels=16,
    norm_groups=8,
    n_embed=64,
    embed_dim=8,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def tiny(**kw) -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig(**{**TINY, **kw}))


@functools.cache
def _photos(resolution: int) -> torch.Tensor:
    from skimage import data

    return torch.stack(
        [load_image(Image.fromarray(getattr(data, n)()), resolution) for n in ("astronaut", "coffee", "chelsea")]
    )


def photos(resolution: int) -> torch.Tensor:
    """Real photographs shipped with scikit-image, (3, 3, R, R) in [-1, 1]."""
    return _photos(resolution).clone()


# ----------------------------------------------------------------------------- model


def test_encode_decode_shapes_and_gradients():
    m = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long and m.grid == (8, 8)
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    img = m.decode_code(codes)
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    out = m(x)
    assert torch.equal(out.quant.codes, codes)  # training pass and encode agree
    (out.recon.square().mean() + out.quant.loss).backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # every weight, encoder included, gets a gradient (straight-through)


def test_decode_code_matches_training_path():
    m = tiny().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = m(x)
        assert torch.allclose(m.decode_code(out.quant.codes), out.recon.clamp(-1, 1), atol=1e-5)


def test_bad_shapes_are_clear_errors():
    m = tiny()
    with pytest.raises(InterleafError, match=r"\(B, 3, 32, 32\)"):
        m.encode(torch.zeros(1, 3, 48, 48))
    with pytest.raises(InterleafError, match=r"\(B, 8, 8\)"):
        m.decode_code(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(InterleafError, match=r"\[0, 64\)"):
        m.decode_code(torch.full((1, 8, 8), 64))
    with pytest.raises(Exception, match="multiple of the downsampling"):
        VQConfig(**{**TINY, "resolution": 30}).validate()


def test_taming_module_names():
    keys = set(VQModel(VQConfig(**{**TINY, "ch_mult": [1, 2, 2]})).state_dict())
    for k in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.attn.0.q.weight",
        "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.k.weight",
        "decoder.up.2.block.0.conv1.weight",
        "decoder.up.0.block.1.conv2.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.1.attn.1.v.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
    ]:
        assert k in keys, k
    assert not any("downsample" in k for k in keys if k.startswith("encoder.down.2."))  # last level keeps resolution
    assert not any("upsample" in k for k in keys if k.startswith("decoder.up.0."))


def test_loads_taming_checkpoint_and_gives_same_codes():
    src = tiny()
    ckpt = {
        "state_dict": {
            **src.state_dict(),
            "loss.discriminator.main.0.weight": torch.zeros(1),
            "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1),
        },
        "global_step": 5,
    }
    dst = VQModel(VQConfig(**TINY))
    dst.load_state_dict(convert_hf_vq_state_dict(ckpt), strict=True)
    x = photos(32)
    assert torch.equal(dst.encode(x), src.encode(x))
    assert torch.equal(dst.decode_code(src.encode(x)), src.decode_code(src.encode(x)))


def _hf_model():
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(1)
    cfg = ChameleonVQVAEConfig(
        resolution=32,
        base_channels=32,
        channel_multiplier=[1, 2],
        num_res_blocks=1,
        latent_channels=32,
        embed_dim=16,
        num_embeddings=128,
        attn_resolutions=[16],
    )
    return ChameleonVQVAE(cfg).eval(), cfg


@pytest.fixture(scope="module")
def hf_model():
    """A small randomly initialised transformers ChameleonVQVAE (nothing downloaded)."""
    return _hf_model()


def test_chameleon_parity_with_transformers(hf_model):
    hf, hf_cfg = hf_model
    cfg = vq_config_from_hf(hf_cfg)
    assert cfg.has_decoder is False and cfg.ch_mult == [1, 2] and cfg.n_embed == 128
    ours = VQModel(cfg).eval()
    # a full Chameleon checkpoint nests the tokenizer under model.vqmodel.
    full = {f"model.vqmodel.{k}": v for k, v in hf.state_dict().items()}
    full["model.embed_tokens.weight"] = torch.zeros(2, 2)
    ours.load_state_dict(convert_hf_vq_state_dict(full), strict=True)
    torch.manual_seed(2)
    for x in (torch.rand(4, 3, 32, 32) * 2 - 1, photos(32)):
        with torch.no_grad():
            theirs = hf.encode(x).image_tokens.view(x.shape[0], 16, 16)
            mine = ours.encode(x)
        assert torch.equal(mine, theirs)
        assert theirs.unique().numel() > 4  # not a degenerate all-same-code comparison
    with pytest.raises(InterleafError, match="no decoder"):
        ours.decode_code(mine)
    # and back: our weights load into transformers' module unchanged
    hf2, _ = _hf_model()
    hf2.load_state_dict(hf_vq_tensors(ours.state_dict()), strict=True)


def test_chameleon_config_shape():
    from interleaf.config import load_config
    from interleaf.tokenizer.vqgan_train import TrainVQConfig

    cfg = load_config(TrainVQConfig, "configs/vqgan/chameleon.yaml").model
    assert (cfg.resolution, cfg.ch, cfg.ch_mult, cfg.num_res_blocks) == (512, 128, [1, 1, 2, 2, 4], 2)
    assert (cfg.z_channels, cfg.embed_dim, cfg.n_embed, cfg.attn_resolutions, cfg.mid_attn) == (
        256,
        256,
        8192,
        [],
        True,
    )
    assert cfg.grid == (32, 32)
    with torch.device("meta"):
        n = sum(p.numel() for p in VQModel(cfg).parameters())
    assert 60e6 < n < 80e6  # Chameleon's tokenizer is ~68M parameters (encoder + decoder)


def test_photos_through_encode_decode():
    m = tiny(n_embed=256)
    x = photos(32)
    codes = m.encode(x)
    y = m.decode_code(codes)
    assert codes.shape == (3, 8, 8) and y.shape == x.shape
    assert torch.equal(m.encode(x), codes)  # deterministic
    assert len({tuple(c.flatten().tolist()) for c in codes}) == 3  # three different photos, three code grids
    assert [to_pil(i).size for i in y] == [(32, 32)] * 3


def test_save_load_round_trip(tmp_path):
    m = tiny(l2_norm=True, restart_dead=True).eval()
    m.save(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["vqgan.safetensors", "vqgan.yaml"]
    m2 = VQModel.load(tmp_path / "vq")
    assert m2.config == m.config
    x = photos(32)
    assert torch.equal(m2.encode(x), m.encode(x))
    assert torch.equal(m2.decode_code(m.encode(x)), m.decode_code(m.encode(x)))


def test_load_errors(tmp_path):
    with pytest.raises(InterleafError, match="not found"):
        VQModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterleafError, match="no vqgan.yaml"):
        VQModel.load(tmp_path / "empty")
    tiny().save(tmp_path / "a")
    tiny(n_embed=32).save(tmp_path / "b")
    (tmp_path / "b" / "vqgan.yaml").replace(tmp_path / "a" / "vqgan.yaml")  # config says 32 codes, weights hold 64
    with pytest.raises(InterleafError, match="wrong shape .*quantize.embedding.weight"):
        VQModel.load(tmp_path / "a")
    (tmp_path / "a" / "vqgan.safetensors").write_bytes(b"garbage")
    with pytest.raises(InterleafError, match="cannot read .*vqgan.safetensors"):
        VQModel.load(tmp_path / "a")


def test_encoder_only_directory(tmp_path, hf_model):
    hf, hf_cfg = hf_model
    m = VQModel(vq_config_from_hf(hf_cfg))
    m.load_state_dict(convert_hf_vq_state_dict(hf.state_dict()))
    m.save(tmp_path / "vq")
    assert "has_decoder: false" in (tmp_path / "vq" / "vqgan.yaml").read_text()
    m2 = VQModel.load(tmp_path / "vq")
    x = photos(32)
    assert torch.equal(m2.encode(x), m.encode(x))
    with pytest.raises(InterleafError, match="decoder weights"):
        m2.decode_code(m2.encode(x))


# ----------------------------------------------------------------------------- quantizer


def test_quantizer_nearest_code_and_straight_through():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=32, embed_dim=4, beta=0.25)
    nn_init = torch.randn(32, 4)
    q.embedding.weight.data.copy_(nn_init)
    z = torch.randn(2, 4, 3, 5, requires_grad=True)
    out = q(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expect = torch.cdist(flat, nn_init).argmin(1).view(2, 3, 5)
    assert torch.equal(out.codes, expect)
    # forward value is the code vector, backward is the identity (straight-through)
    assert torch.allclose(out.z_q, nn_init[expect].permute(0, 3, 1, 2), atol=1e-6)
    g = torch.randn_like(z)
    (zg,) = torch.autograd.grad((out.z_q * g).sum(), z, retain_graph=True)
    assert torch.equal(zg, g)
    # the codebook learns only from the codebook loss, the encoder only from commitment
    (eg,) = torch.autograd.grad(out.loss, q.embedding.weight, retain_graph=True)
    assert eg.abs().sum() > 0 and eg[~torch.isin(torch.arange(32), expect)].abs().sum() == 0
    mse = ((nn_init[expect].permute(0, 3, 1, 2) - z.detach()) ** 2).mean()
    assert torch.allclose(out.loss, 1.25 * mse) and torch.allclose(out.commitment_loss, mse)


def test_l2_norm_codes_and_usage_stats():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=16, embed_dim=3, l2_norm=True)
    z = torch.randn(4, 3, 4, 4) * 5
    out = q(z)
    assert torch.allclose(out.z_q.norm(dim=1), torch.ones(4, 4, 4), atol=1e-5)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 3), dim=1)
    cos = flat @ torch.nn.functional.normalize(q.embedding.weight, dim=1).T
    assert torch.equal(out.codes.flatten(), cos.argmax(1))  # nearest on the sphere = highest cosine
    stats = code_stats(out.codes, 16)
    assert stats["usage"] == pytest.approx(100 * out.codes.unique().numel() / 16)
    assert stats["perplexity"] == pytest.approx(float(out.perplexity), rel=1e-5)
    assert code_stats(torch.zeros(10, dtype=torch.long), 4) == {"usage": 25.0, "perplexity": pytest.approx(1.0)}


def test_ema_codebook_moves_to_assigned_mean():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=4, embed_dim=2, ema=True, ema_decay=0.5).train()
    assert not q.embedding.weight.requires_grad
    z = torch.randn(1, 2, 8, 8)
    codes = q(z).codes.flatten()
    k = int(codes.mode().values)
    before = q.embedding.weight[k].clone()
    for _ in range(20):
        out = q(z)
    mean = z.permute(0, 2, 3, 1).reshape(-1, 2)[out.codes.flatten() == k].mean(0)
    assert torch.allclose(q.embedding.weight[k], mean, atol=1e-2) and not torch.allclose(before, mean, atol=1e-2)
    assert float(out.codebook_loss) == 0.0


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=8, embed_dim=2, restart_dead=True).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0]] + [[100.0, 100.0]] * 7))  # only code 0 is near the data
    z = torch.randn(2, 2, 4, 4)
    for _ in range(10):
        q(z)
    assert q(z).codes.unique().tolist() == [0]
    n = q.restart_dead_codes(z, threshold=0.5, generator=torch.Generator().manual_seed(0))
    assert n == 7
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(q.embedding.weight[1:], flat).min(1).values.max() < 0.01  # moved onto data points
    assert q(z).codes.unique().numel() > 3


# ----------------------------------------------------------------------------- image io


def test_load_image_crop_resize_and_round_trip(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = (255, 0, 0)  # the centre square is all red; the side bars are cropped away
    Image.fromarray(a).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 20)
    assert (
        x.shape == (3, 20, 20)
        and torch.allclose(x[0], torch.ones(20, 20))
        and torch.allclose(x[1:], -torch.ones(2, 20, 20))
    )
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.allclose(load_image(rgba, 8), torch.ones(3, 8, 8))  # transparent -> white
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(to_pil(load_image(img, 16))), np.asarray(img))  # lossless round trip
    x = photos(48)
    assert x.shape == (3, 3, 48, 48) and x.min() >= -1 and x.max() <= 1
    assert psnr(x, x).min() > 90 and psnr(x, -x).max() < 10


def test_unreadable_images_are_clear_errors(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(InterleafError, match=r"cannot read image .*notes.png: not an image file"):
        load_image(tmp_path / "notes.png", 32)
    with pytest.raises(InterleafError, match="cannot read image .*missing.jpg"):
        load_image(tmp_path / "missing.jpg", 32)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(InterleafError, match="no image files"):
        list_images(tmp_path / "sub")


# ----------------------------------------------------------------------------- losses


def test_discriminator_hinge_and_adaptive_weight():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, ndf=8, n_layers=2)
    assert "main.0.weight" in d.state_dict() and "main.3.running_mean" in d.state_dict()  # taming names
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0  # both beyond the margin
    assert float(hinge_d_loss(torch.zeros(4), torch.zeros(4))) == 1.0
    last = torch.nn.Parameter(torch.ones(3))
    nll, g = (last * 2).sum(), (last * 4).sum()  # gradients of norm 2*sqrt(3) and 4*sqrt(3)
    assert float(adaptive_weight(nll, g, last)) == pytest.approx(0.5, rel=1e-3)


def test_lpips_from_local_weights_only(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    state = {}
    for k, v in ref.state_dict().items():  # torchvision-style VGG16 names + lpips lin names, as users have them
        if k.startswith("net.slice"):
            state["features." + k.split(".", 2)[2]] = torch.randn_like(v) * 0.05
        else:
            state[k] = torch.rand_like(v)
    torch.save(state, tmp_path / "lpips.pth")
    p = load_lpips(tmp_path / "lpips.pth")
    x = photos(32)
    d_same, d_diff = p(x, x), p(x, x.flip(-1))
    assert torch.all(d_same.abs() < 1e-6) and torch.all(d_diff > 1e-4)
    del state["lin4.model.1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(InterleafError, match="lin4"):
        load_lpips(tmp_path / "partial.pth")
    with pytest.raises(InterleafError, match="not found"):
        load_lpips(tmp_path / "nowhere.pth")


# ----------------------------------------------------------------------------- Chameleon's preprocessing


def meta_preprocess(img: Image.Image, target_image_size: int) -> torch.Tensor:
    """Meta's Chameleon tokenizer (`ImageTokenizer._whiten_transparency` then `_vqgan_input_from`),
    transcribed as literally as possible: the reference for `load_image`."""
    if img.mode != "RGB":
        vals_rgba = np.array(img.convert("RGBA"))
        if not (vals_rgba[:, :, 3] < 255).any():
            img = img.convert("RGB")
        else:
            alpha = vals_rgba[:, :, 3] / 255.0
            vals_rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * vals_rgba[:, :, :3]
            img = Image.fromarray(vals_rgb.astype("uint8"), "RGB")
    s = min(img.size)
    scale = target_image_size / s
    new_size = (round(scale * img.size[0]), round(scale * img.size[1]))
    img = img.resize(new_size, Image.LANCZOS)
    x0 = (img.width - target_image_size) // 2
    y0 = (img.height - target_image_size) // 2
    img = img.crop((x0, y0, x0 + target_image_size, y0 + target_image_size))
    np_img = np.array(img) / 255.0
    np_img = np_img * 2 - 1
    return torch.from_numpy(np_img).permute(2, 0, 1).float()


def photos_and_cutouts():
    """scikit-image's photographs: square (astronaut 512x512) and not (chelsea 451x300, coffee 600x400),
    plus RGBA versions: a cut-out (alpha 0 or 255 only, as a photo on a transparent background) and a
    soft alpha ramp."""
    from skimage import data

    imgs = {n: Image.fromarray(getattr(data, n)()) for n in ("astronaut", "chelsea", "coffee")}
    a = np.asarray(imgs["chelsea"])
    yy, xx = np.indices(a.shape[:2])
    disc = (yy - 150) ** 2 + (xx - 225) ** 2 < 140**2
    imgs["chelsea cut-out"] = Image.fromarray(np.dstack([a, np.where(disc, 255, 0).astype(np.uint8)]), "RGBA")
    c = np.asarray(imgs["coffee"])
    ramp = np.linspace(0, 255, c.shape[1]).astype(np.uint8)[None, :].repeat(c.shape[0], 0)
    imgs["coffee alpha ramp"] = Image.fromarray(np.dstack([c, ramp]), "RGBA")
    return imgs


@pytest.mark.parametrize("resolution", [32, 512])
def test_load_image_is_chameleons_preprocessing(resolution):
    for name, img in photos_and_cutouts().items():
        ours, ref = load_image(img, resolution), meta_preprocess(img, resolution)
        assert ours.shape == ref.shape == (3, resolution, resolution), name
        # the same 8-bit pixels; the float mapping within one float32 step (float32 here, float64 there)
        assert torch.equal(((ours + 1) * 127.5).round(), ((ref + 1) * 127.5).round()), name
        torch.testing.assert_close(ours, ref, rtol=0, atol=1.2e-7)
    # negative control: the old order (centre square first, then resize) gives other pixels
    old = Image.fromarray(np.asarray(photos_and_cutouts()["chelsea"])[:, 75:375]).resize((512, 512), Image.LANCZOS)
    assert not torch.equal(load_image(photos_and_cutouts()["chelsea"], 512), load_image(old, 512))


def test_square_rgb_images_at_the_resolution_pass_unchanged():
    """The shapes world draws RGB scenes at the VQ-GAN's resolution: their tensors are the plain pixel
    mapping, as before the preprocessing followed Chameleon's (the demo's numbers do not move)."""
    from interleaf.data.shapes import ShapesWorld
    from interleaf.tokenizer.image import pil_to_tensor

    world = ShapesWorld(resolution=64, seed=3)
    for i in range(8):
        scene = world.render(world.scene(i))
        assert torch.equal(load_image(scene, 64), pil_to_tensor(scene))


def test_codes_equal_transformers_processor_and_encoder(hf_model):
    """transformers' ChameleonImageProcessor + ChameleonVQVAE give the same codes as load_image +
    our VQ-GAN on real photographs, non-square and RGBA ones included.

    Two documented differences of transformers' processor from Meta's tokenizer are set or kept
    apart: it maps pixels with x * 0.0078 - 1 (Meta: x / 255 * 2 - 1; set here to Meta's), and it
    composites partial transparency with PIL's rounding where Meta truncates (the ramp image: at
    most one 8-bit level apart). At 512 px it also truncates the long side where Meta rounds
    (chelsea: 769 against 770 px); at this VQ-GAN's 32 px both give the same size.
    """
    from transformers import ChameleonImageProcessorPil

    hf, hf_cfg = hf_model
    ours = VQModel(vq_config_from_hf(hf_cfg)).eval()
    ours.load_state_dict(convert_hf_vq_state_dict(hf.state_dict()), strict=True)
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    meta_scale = ChameleonImageProcessorPil(**size, rescale_factor=2 / 255)
    default_scale = ChameleonImageProcessorPil(**size)
    for name, img in photos_and_cutouts().items():
        mine = load_image(img, 32)[None]
        theirs = torch.as_tensor(np.asarray(meta_scale(img, return_tensors="np")["pixel_values"]))
        with torch.no_grad():
            want, got = hf.encode(theirs).image_tokens.view(1, 16, 16), ours.encode(mine)
        assert want.unique().numel() > 10, name  # a real comparison, not one code everywhere
        if name == "coffee alpha ramp":
            assert 0 < float((mine - theirs).abs().max()) <= 2 / 255 + 1e-6
            continue
        assert torch.equal(mine, theirs), name
        assert torch.equal(got, want), name
        scaled = torch.as_tensor(np.asarray(default_scale(img, return_tensors="np")["pixel_values"]))
        torch.testing.assert_close(scaled, ((mine + 1) * 127.5).round() * 0.0078 - 1, rtol=0, atol=1e-6)  # scale only
