"""Loading the VAE from the places it lives, dtypes, and every bad input getting a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vae
from mmditx.checkpoint import CheckpointError, open_safetensors, save_safetensors
from tests.official import write_random_checkpoint
from tests.test_vae_reference import PREFIX, SMALL, vae_layout, write_vae_file
from vae import VAEConfig, load_vae, read_vae_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae_files")
    transformer = {"model.diffusion_model.x_embedder.proj.weight": (32, 16, 2, 2)}
    return {
        # the single file: transformer and VAE side by side
        "single": write_vae_file(d / "sd3.5_medium.safetensors", extra=transformer, seed=1),
        # a separate VAE file, with and without the prefix, the same weights
        "bare": write_vae_file(d / "vae.safetensors", prefix="", seed=1),
        "fp16": write_vae_file(d / "vae_fp16.safetensors", dtype=torch.float16, seed=1),
        "dir": d,
    }


def test_same_weights_from_every_layout(files):
    a, b = load_vae(files["single"]), load_vae(files["bare"])
    assert a.config == b.config == SMALL
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name
    assert read_vae_config(files["single"]) == SMALL
    latent = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(a.decode(latent), b.decode(latent), rtol=0, atol=0)


def test_dtypes(files):
    stored = load_vae(files["fp16"], dtype=None)
    assert stored.decoder.conv_in.weight.dtype == torch.float16
    up = load_vae(files["fp16"], dtype="fp32")
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert not any(p.requires_grad for p in up.parameters()) and not up.training
    f = open_safetensors(files["fp16"])
    torch.testing.assert_close(up.encoder.conv_in.weight, f.tensor(PREFIX + "encoder.conv_in.weight").float())
    # Outputs are float32 whatever the weights, and inputs are moved to the weights' dtype.
    assert up.decode(torch.randn(1, 16, 2, 2, dtype=torch.float64)).dtype == torch.float32


def test_bare_vae_next_to_other_components(tmp_path):
    """A prefix-less file holding more than the VAE (e.g. a bare transformer) loads the VAE, ignoring the rest."""
    shapes = vae_layout(SMALL, prefix="")
    shapes["joint_blocks.0.x_block.attn.qkv.weight"] = (6, 2)
    model = load_vae(write_random_checkpoint(shapes, tmp_path / "mixed.safetensors"))
    assert model.config == SMALL


def test_config_is_inferred_from_shapes(tmp_path):
    config = VAEConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    model = load_vae(write_vae_file(tmp_path / "other.safetensors", config))
    assert model.config == config and model.config.downscale == 2
    assert model.decode(torch.randn(1, 4, 3, 5)).shape == (1, 3, 6, 10)


def test_file_without_vae(tmp_path):
    path = write_random_checkpoint({"model.diffusion_model.x_embedder.proj.weight": (32, 16, 2, 2)},
                                   tmp_path / "transformer_only.safetensors")
    with pytest.raises(CheckpointError, match=r"no VAE weights found.*model"):
        load_vae(path)


def test_incomplete_diffusers_format_vae(tmp_path):
    """diffusers-format VAEs load (tests/test_model_formats.py); an incomplete one names what is missing."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_safetensors({"decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2, 3, 3),
                      "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: missing key 'encoder\.conv_in"):
        load_vae(path)
    save_safetensors({"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: a diffusers-format VAE without"):
        load_vae(path)


def test_sdxl_style_vae(tmp_path):
    shapes = vae_layout(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    shapes[PREFIX + "quant_conv.weight"], shapes[PREFIX + "quant_conv.bias"] = (8, 8, 1, 1), (8,)
    with pytest.raises(CheckpointError, match="quant_conv.*not the 16-channel SD3 VAE"):
        load_vae(write_random_checkpoint(shapes, tmp_path / "sdxl_vae.safetensors"))


def test_decoder_only_file(tmp_path):
    shapes = {k: v for k, v in vae_layout(SMALL).items() if k.startswith(PREFIX + "decoder.")}
    with pytest.raises(CheckpointError, match="encoder is not"):
        load_vae(write_random_checkpoint(shapes, tmp_path / "decoder_only.safetensors"))


def test_missing_and_misshaped_keys(tmp_path):
    shapes = vae_layout(SMALL)
    del shapes[PREFIX + "decoder.mid.attn_1.q.bias"]
    shapes[PREFIX + "decoder.conv_out.weight"] = (3, 32, 1, 1)
    with pytest.raises(CheckpointError, match=r"missing key.*decoder\.mid\.attn_1\.q\.bias.*shape mismatch.*conv_out"):
        load_vae(write_random_checkpoint(shapes, tmp_path / "broken.safetensors"))


def test_truncated_and_foreign_files(tmp_path, files):
    data = files["single"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vae(tmp_path / "cut.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_vae(tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_vae(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def small(files):
    return load_vae(files["single"])


@pytest.mark.parametrize("latent,match", [
    (torch.zeros(1, 4, 8, 8), "expects 16 latent channels, got 4.*SD1.x/SDXL"),
    (torch.zeros(16, 8, 8), r"\(batch, 16, height/8, width/8\).*latent\[None\]"),
    (torch.zeros(1, 16, 8, 8, dtype=torch.int64), "floating-point"),
])
def test_bad_latents(small, latent, match):
    with pytest.raises(ValueError, match=match):
        small.decode(latent)


@pytest.mark.parametrize("image,match", [
    (torch.zeros(1, 3, 60, 64), r"64x60 \(width x height\) is not a positive multiple of 8.*64x56"),
    (torch.zeros(1, 3, 64, 13), "13x64"),
    (torch.zeros(1, 4, 64, 64), "3 image channels.*got 4"),
    (torch.zeros(3, 64, 64), r"\(batch, 3, height, width\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float image"),
])
def test_bad_images(small, image, match):
    with pytest.raises(ValueError, match=match):
        small.encode(image)


def test_odd_latent_sizes_decode(small):
    """Any latent size decodes (odd ones too), to 8x the size, tiled or not."""
    for h, w in [(1, 1), (3, 7), (5, 2)]:
        assert small.decode(torch.randn(2, 16, h, w)).shape == (2, 3, 8 * h, 8 * w)
    assert small.decode(torch.randn(1, 16, 9, 7), tiled=True, tile=4, overlap=1).shape == (1, 3, 72, 56)


def test_pil_round_trip(small):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    x = vae.image_to_tensor(Image.fromarray(pixels))
    assert x.shape == (1, 3, 64, 48) and x.min() >= -1 and x.max() <= 1
    # Official conversions, written out: in x / 255 * 2 - 1; out trunc(clamp((x + 1) / 2) * 255).
    torch.testing.assert_close(x[0].permute(1, 2, 0), torch.from_numpy(pixels / 255.0 * 2 - 1).float())
    back = np.asarray(vae.tensor_to_images(x + 1e-4)[0])
    assert np.array_equal(back, pixels)
    assert np.asarray(vae.tensor_to_images(torch.full((1, 3, 2, 2), 0.999))[0]).max() == 254  # truncated
    latent = small.encode(vae.image_to_tensor([Image.fromarray(pixels)] * 2), sample=False)
    assert latent.shape == (2, 16, 8, 6)
    with pytest.raises(ValueError, match="different sizes"):
        vae.image_to_tensor([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))])
    rgba = vae.image_to_tensor(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    assert rgba.shape == (1, 3, 8, 8) and rgba[0, 0].eq(1).all()


def test_latent_preview():
    """The SD3 latent->RGB factors (ComfyUI's): a zero latent shows the bias colour, and the map is linear."""
    zero = vae.latent_preview(torch.zeros(1, 16, 6, 10))
    assert zero.size == (10, 6)
    bias = np.array([0.2394, 0.2135, 0.1925])
    assert np.array_equal(np.asarray(zero)[0, 0], ((bias + 1) / 2 * 255).astype(np.uint8))
    latent = torch.randn(1, 16, 6, 10) * 0.5
    rgb = vae.latent_to_rgb(latent)
    factors = torch.tensor(vae.images.SD3_LATENT_RGB_FACTORS)
    want = (latent[0].permute(1, 2, 0) @ factors + torch.tensor(bias).float()).clamp(-1, 1)
    torch.testing.assert_close(rgb[0].permute(1, 2, 0), want)
    assert vae.latent_preview(latent[0], upscale=8).size == (80, 48)
    with pytest.raises(ValueError, match="16"):
        vae.latent_preview(torch.zeros(1, 4, 8, 8))
