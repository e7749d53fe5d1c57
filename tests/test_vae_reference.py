"""The VAE against an independent implementation: diffusers' AutoencoderKL (16 latent channels, no quant convs),
loaded from the same random weights through diffusers' own single-file converter `convert_ldm_vae_checkpoint`.

Every ResNet block, every down/up level, the mid blocks, the encoder moments and the decoder image are compared
in fp32 through forward hooks on both sides. Small widths keep it fast; one test runs the full-size official
layout on a tiny image.

Also the helpers the other VAE test files use: a small VAE checkpoint in the official layout and its diffusers twin.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmditx.checkpoint import build_on_meta, expected_shapes, open_safetensors
from vae.diffusers_names import diffusers_vae_kwargs
from tests.official import official_layout, write_random_checkpoint
import vae
from vae import VAE, VAEConfig, load_vae

diffusers = pytest.importorskip("diffusers", reason="the `reference` extra (diffusers) is the oracle")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

PREFIX = "first_stage_model."
# Smallest widths GroupNorm(32) allows, four levels (8x downscale) like SD3, two blocks per level.
SMALL = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=16)
# fp32 agreement with diffusers: max |ours - theirs| <= RTOL * max |theirs| at every compared stage.
RTOL = 1e-5


def vae_layout(config: VAEConfig, prefix: str = PREFIX) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a VAE of any size in the official layout. `test_full_size_layout_is_official` checks
    that the full-size one equals the official listing exactly, and diffusers' converter + strict loading
    checks every name of the small ones independently."""
    model = build_on_meta(lambda: VAE(config))
    return {prefix + k: v for k, v in expected_shapes(model).items()}


def write_vae_file(path: Path, config: VAEConfig = SMALL, prefix: str = PREFIX, extra: dict | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    shapes = vae_layout(config, prefix)
    shapes.update(extra or {})
    return write_random_checkpoint(shapes, path, dtype=dtype, seed=seed)


def diffusers_vae(path: Path, config: VAEConfig) -> AutoencoderKL:
    """diffusers' AutoencoderKL for `config`, loaded from our file through diffusers' own LDM converter."""
    # SD3's latent scale and shift written here from the official config, not taken from our VAEConfig
    model = AutoencoderKL(**{**diffusers_vae_kwargs(config), "scaling_factor": 1.5305, "shift_factor": 0.0609})
    f = open_safetensors(path)
    checkpoint = {k: f.tensor(k).float() for k in f.keys()}
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(model.config))
    model.load_state_dict(converted, strict=True)  # every name and shape must map: an independent layout check
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    path = write_vae_file(tmp_path_factory.mktemp("vae") / "sd3.5_medium.safetensors", SMALL)
    return load_vae(path), diffusers_vae(path, SMALL)


def _stage_pairs(ours: VAE, theirs: AutoencoderKL, config: VAEConfig):
    """(name, our module, diffusers module) for every compared stage, in execution order."""
    levels = len(config.ch_mult)
    pairs = [("encoder.conv_in", ours.encoder.conv_in, theirs.encoder.conv_in)]
    for i in range(levels):
        for j in range(config.num_res_blocks):
            pairs.append((f"encoder.down.{i}.block.{j}", ours.encoder.down[i].block[j], theirs.encoder.down_blocks[i].resnets[j]))
        pairs.append((f"encoder.down.{i}", ours.encoder.down[i], theirs.encoder.down_blocks[i]))
    pairs += [
        ("encoder.mid.block_1", ours.encoder.mid.block_1, theirs.encoder.mid_block.resnets[0]),
        ("encoder.mid.attn_1", ours.encoder.mid.attn_1, theirs.encoder.mid_block.attentions[0]),
        ("encoder.mid", ours.encoder.mid, theirs.encoder.mid_block),
        ("encoder", ours.encoder, theirs.encoder),
        ("decoder.conv_in", ours.decoder.conv_in, theirs.decoder.conv_in),
        ("decoder.mid.block_1", ours.decoder.mid.block_1, theirs.decoder.mid_block.resnets[0]),
        ("decoder.mid.attn_1", ours.decoder.mid.attn_1, theirs.decoder.mid_block.attentions[0]),
        ("decoder.mid", ours.decoder.mid, theirs.decoder.mid_block),
    ]
    for i in range(levels):  # diffusers' up_blocks[i] is the official up.{levels-1-i}: the order they run in
        level = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            pairs.append((f"decoder.up.{level}.block.{j}", ours.decoder.up[level].block[j], theirs.decoder.up_blocks[i].resnets[j]))
        pairs.append((f"decoder.up.{level}", ours.decoder.up[level], theirs.decoder.up_blocks[i]))
    pairs.append(("decoder", ours.decoder, theirs.decoder))
    return pairs


def _record(pairs):
    """Hook every pair; returns (ours, theirs) dicts of cloned outputs and the hook handles."""
    ours, theirs, handles = {}, {}, []
    for name, a, b in pairs:
        handles.append(a.register_forward_hook(lambda m, i, o, n=name: ours.__setitem__(n, o.detach().clone())))
        handles.append(b.register_forward_hook(
            lambda m, i, o, n=name: theirs.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    return ours, theirs, handles


def compare_all_stages(ours: VAE, theirs: AutoencoderKL, config: VAEConfig, image: torch.Tensor,
                       latent: torch.Tensor) -> dict[str, float]:
    """Run both models' encoder on `image` and decoder on the model-space `latent`; return the relative max
    error per stage (and assert every stage was seen on both sides)."""
    pairs = _stage_pairs(ours, theirs, config)
    got, want, handles = _record(pairs)
    try:
        with torch.no_grad():
            ours.encode(image, sample=False, tiled=False)
            theirs.encode(image)
            ours.decode(latent, tiled=False)
            theirs.decode(latent / 1.5305 + 0.0609)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    for name, _, _ in pairs:
        assert name in got and name in want, f"stage {name} did not run on both sides"
        assert got[name].shape == want[name].shape, (name, got[name].shape, want[name].shape)
        errors[name] = ((got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-12)).item()
    return errors


def test_every_stage_matches_diffusers(small_pair):
    ours, theirs = small_pair
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1      # non-square: catches any H/W swap
    latent = torch.randn(2, 16, 8, 6, generator=g)
    errors = compare_all_stages(ours, theirs, SMALL, image, latent)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: relative error {errors[worst]:.2e} (all: {errors})"
    assert len(errors) == 1 + 4 * 3 + 3 + 1 + 1 + 3 + 4 * 4 + 1


def test_encode_decode_semantics_match_diffusers(small_pair):
    """The public API: decode = clamp(decoder(latent / 1.5305 + 0.0609)), encode = (mean - 0.0609) * 1.5305 with the
    log-variance clamped, and sampling draws the same noise as diffusers' latent_dist.sample(generator)."""
    ours, theirs = small_pair
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 8, 8, generator=g) * 2

    with torch.no_grad():
        want_image = theirs.decode(latent / 1.5305 + 0.0609).sample.clamp(-1, 1)
        dist = theirs.encode(image).latent_dist
        want_mean = (dist.mean - 0.0609) * 1.5305
        want_sample = (dist.sample(generator=torch.Generator().manual_seed(7)) - 0.0609) * 1.5305
    got_image = ours.decode(latent)
    assert got_image.min() >= -1 and got_image.max() <= 1
    torch.testing.assert_close(got_image, want_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.encode(image, sample=False), want_mean, rtol=0, atol=1e-5)
    got_sample = ours.encode(image, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got_sample, want_sample, rtol=0, atol=1e-5)
    mean, logvar = ours.encode_moments(image)
    torch.testing.assert_close(logvar, dist.logvar, rtol=0, atol=1e-5)
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_logvar_is_clamped():
    """A log-variance far outside [-30, 20] is clamped (conv_out bias pushed to +-1000 on the logvar half)."""
    model = VAE(SMALL).eval()
    with torch.no_grad():
        model.encoder.conv_out.bias[16:24] = 1000.0
        model.encoder.conv_out.bias[24:] = -1000.0
    mean, logvar = model.encode_moments(torch.zeros(1, 3, 16, 16))
    assert (logvar[:, :8] == 20).all() and (logvar[:, 8:] == -30).all()
    assert torch.isfinite(model.encode(torch.zeros(1, 3, 16, 16))).all()


def test_full_size_layout_is_official():
    """The full-size VAE built on meta has exactly the names and shapes of the official `first_stage_model.` keys."""
    official = {k: v for k, v in official_layout("sd3.5_medium").items() if k.startswith(PREFIX)}
    assert vae_layout(VAEConfig()) == official
    assert vae.config_from_shapes({k[len(PREFIX):]: v for k, v in official.items()}) == VAEConfig()


def test_full_size_weights_match_diffusers(tmp_path):
    """The real SD3 widths (128-512, 84M parameters) from a file in the exact official layout, on a tiny image."""
    official = {k: v for k, v in official_layout("sd3.5_medium").items() if k.startswith(PREFIX)}
    path = write_random_checkpoint(official, tmp_path / "vae_full.safetensors", dtype=torch.float16, seed=3)
    ours = load_vae(path, dtype=torch.float32)
    assert ours.config == VAEConfig()
    theirs = diffusers_vae(path, VAEConfig())
    g = torch.Generator().manual_seed(0)
    errors = compare_all_stages(ours, theirs, VAEConfig(), torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
                                torch.randn(1, 16, 4, 4, generator=g))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: relative error {errors[worst]:.2e}"
