"""ControlNet end to end: our pipeline against diffusers' StableDiffusion3ControlNetPipeline from the same tiny
random components (see test_pipeline_reference.py for the two documented differences set to match), and the
pipeline's and CLI's own rules (strength 0, memory modes, metadata, errors).

diffusers samples the VAE's latent distribution of the control image with an unseeded generator; we take the
mean (sampling/control.py), so the oracle's `sample` is made to return the mean too.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sampling.control import ControlSpec, canny_edges, control_pixels, gaussian_blur
from sampling.pipeline import GenerationParams, ModelFiles, Pipeline
from tests.test_controlnet import randomize
from tests.test_pipeline_reference import diffusers_pipeline, model_dir  # noqa: F401 (fixture)

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def control(model_dir, tmp_path_factory):  # noqa: F811
    from diffusers import SD3ControlNetModel
    from sampling.embedded import TRANSFORMER as cfg
    d = tmp_path_factory.mktemp("control")
    net = randomize(SD3ControlNetModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64,
        num_attention_heads=cfg.hidden_size // 64, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim, out_channels=16,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=(0,), qk_norm="rms_norm"), seed=11)
    net.save_pretrained(d / "net")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    image.save(d / "control.png")
    return dict(dir=d, net=net, image=image)


PARAMS = dict(prompt="a photo of a cat", negative_prompt="blurry", width=128, height=96, steps=4, cfg=4.5,
              shift=3.0, sampler="euler", seed=3, slg=False)


def test_controlnet_pipeline_matches_diffusers(model_dir, control, monkeypatch):  # noqa: F811
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    spec = (control["dir"] / "net", control["dir"] / "control.png", 0.8, 0.0, 0.5)
    ours = Pipeline(ModelFiles.from_dir(model_dir, t5="fp16"), device="cpu", dtype="fp32", controlnets=[spec])
    _, latents = ours.generate(GenerationParams(**PARAMS), return_latents=True)

    base = diffusers_pipeline(model_dir, ours)
    ref = StableDiffusion3ControlNetPipeline(**base.components, controlnet=control["net"])
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    noise = torch.randn((1, 16, 12, 16), generator=torch.Generator("cpu").manual_seed(3))
    with torch.no_grad():
        ref_latents = ref(prompt="a photo of a cat", negative_prompt="blurry", height=96, width=128,
                          num_inference_steps=4, guidance_scale=4.5, latents=noise.clone(), max_sequence_length=77,
                          control_image=control["image"], controlnet_conditioning_scale=0.8,
                          control_guidance_start=0.0, control_guidance_end=0.5, output_type="latent").images
    scale = ref_latents.abs().max()
    assert (latents - ref_latents).abs().max() <= 1e-4 * scale
    # the net really steered: without it the latents differ
    plain = Pipeline(ModelFiles.from_dir(model_dir, t5="fp16"), device="cpu", dtype="fp32")
    _, plain_latents = plain.generate(GenerationParams(**PARAMS), return_latents=True)
    assert (plain_latents - latents).abs().max() > 1e-3 * scale


def test_strength_zero_is_the_plain_image_and_modes_agree(model_dir, control):  # noqa: F811
    files = ModelFiles.from_dir(model_dir, t5="off")
    params = GenerationParams(**{**PARAMS, "steps": 3, "slg": True, "slg_layers": (3, 4), "slg_start": 0.0,
                                 "slg_end": 1.0, "sampler": "dpmpp_2m"})
    spec = (control["dir"] / "net", control["dir"] / "control.png")
    plain = Pipeline(files, memory="sequential").generate(params, return_latents=True)[1]
    zero = Pipeline(files, memory="sequential", controlnets=[(*spec, 0.0)]).generate(params, return_latents=True)[1]
    assert torch.equal(plain, zero)
    resident = Pipeline(files, controlnets=[(*spec, 1.0)]).generate(params, return_latents=True)[1]
    frugal = Pipeline(files, memory="frugal", controlnets=[(*spec, 1.0)]).generate(params, return_latents=True)[1]
    assert (resident - plain).abs().max() > 1e-3
    # frugal keeps the stored fp32 weights and computes in fp32: the same numbers
    assert torch.allclose(resident, frugal, rtol=0, atol=1e-5 * resident.abs().max())


def test_control_pixels_per_type():
    """sd3_infer.vae_encode: 2x-1, except the 8b nets' canny: x * 255 * 0.5 + 0.5."""
    from mmditx.controlnet import ControlNetConfig
    image = Image.fromarray(np.full((16, 16, 3), 51, dtype=np.uint8))
    big, small = ControlNetConfig(128, 2, variant="8b"), ControlNetConfig(128, 2, variant="2b")
    assert torch.allclose(control_pixels(image, big, "canny", 16, 16), torch.full((1, 3, 16, 16), 0.2 * 127.5 + 0.5))
    for cfg, kind in ((big, "blur"), (big, "depth"), (small, "canny"), (big, None)):
        assert torch.allclose(control_pixels(image, cfg, kind, 16, 16), torch.full((1, 3, 16, 16), -0.6))
    assert control_pixels(image, big, "blur", 32, 48).shape == (1, 3, 48, 32)


def test_preprocessors():
    cv2 = pytest.importorskip("cv2")
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[8:24, 8:24] = 255
    edges = np.asarray(canny_edges(Image.fromarray(a)))
    assert np.array_equal(edges[..., 0], cv2.Canny(a[..., 0], 100, 200)) and edges[8, 8:24].max() == 255
    blurred = np.asarray(gaussian_blur(Image.fromarray(a), 5))
    assert np.array_equal(blurred, cv2.GaussianBlur(a, (5, 5), 0)) and 0 < blurred[8, 8, 0] < 255


def test_bad_inputs(model_dir, control, tmp_path):  # noqa: F811
    files = ModelFiles.from_dir(model_dir, t5="off")
    net, image = control["dir"] / "net", control["dir"] / "control.png"
    with pytest.raises(ValueError, match="control image .*missing.png not found"):
        Pipeline(files, memory="sequential", controlnets=[(net, tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="unknown control type 'edges'"):
        ControlSpec.parse((net, image, 1.0, 0.0, 1.0, "edges"))
    with pytest.raises(ValueError, match="start < end"):
        ControlSpec.parse((net, image, 1.0, 0.6, 0.4))
    with pytest.raises(ValueError, match="no depth model"):
        ControlSpec.parse((net, image, 1.0, 0.0, 1.0, "depth", True))
    # a net of another width: named with the model
    from diffusers import SD3ControlNetModel
    wide = SD3ControlNetModel(num_layers=1, num_attention_heads=3, joint_attention_dim=4096, caption_projection_dim=192,
                              pos_embed_max_size=16)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"wide \(width 192, 1 blocks\) cannot steer this transformer \(width 128"):
        Pipeline(files, memory="sequential", controlnets=[(tmp_path / "wide", image)])


def test_generate_cli_records_and_reproduces(model_dir, control, tmp_path, capsys):  # noqa: F811
    from sampling.io import read_png_params
    from scripts.generate import main
    net, image = control["dir"] / "net", control["dir"] / "control.png"
    common = ["--model-dir", str(model_dir), "--t5", "off", "--width", "128", "--height", "96", "--steps", "2",
              "--quiet", "--memory", "sequential"]
    main([*common, "--prompt", "a cat", "--controlnet", str(net), "--control-image", str(image),
          "--control-strength", "0.7", "--control-end", "0.5", "--out", str(tmp_path / "a.png")])
    meta = read_png_params(tmp_path / "a.png")
    assert meta["controlnets"] == [dict(file=str(net), image=str(image), strength=0.7, start=0.0, end=0.5, type=None,
                                        preprocess=False)]
    # files named by metadata are not read on their own (as for init images): the paths are given again,
    # the stored strength and step range are reused
    assert main([*common, "--reproduce", str(tmp_path / "a.png"), "--out", str(tmp_path / "x.png")]) == 1
    assert "never read on their own; pass --controlnet FILE --control-image IMG" in capsys.readouterr().err
    assert main([*common, "--reproduce", str(tmp_path / "a.png"), "--controlnet", str(net), "--control-image",
                 str(image), "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert json.loads(Image.open(tmp_path / "b.png").text["mmditx"])["controlnets"] == meta["controlnets"]
    capsys.readouterr()
    assert main([*common, "--prompt", "a cat", "--controlnet", str(net), "--out", str(tmp_path / "c.png")]) == 1
    assert "one --control-image per --controlnet" in capsys.readouterr().err
    assert main([*common, "--prompt", "a cat", "--controlnet", str(net), "--control-image", str(image),
                 "--control-preprocess", "--out", str(tmp_path / "d.png")]) == 1
    assert "preprocessing needs the control type" in capsys.readouterr().err


def test_denoiser_step_range_and_no_controls_in_the_slg_pass():
    """Official SkipLayerCFGDenoiser: the skip-layer pass calls the model without controlnet_cond."""
    from sampling.guidance import GuidedDenoiser, SkipLayerGuidance
    seen = []

    def model(x, t, context, y, skip_layers=(), controls=()):
        seen.append((tuple(skip_layers), [c[2] for c in controls]))
        return torch.zeros_like(x)

    spec = ControlSpec("net.safetensors", "control.png", strength=0.5, start=0.0, end=0.5)
    ctx, y = torch.zeros(1, 3, 8), torch.zeros(1, 4)
    d = GuidedDenoiser(model, (ctx, y), (ctx, y), 2.0, 4, SkipLayerGuidance((1,), 1.0, 0.0, 1.0),
                       controls=[("net", "latent", spec)])
    for _ in range(4):
        d(torch.zeros(1, 2, 4, 4), torch.tensor(0.5))
    # SLG from step 1 (start*steps < step), the net on steps 0 and 1 (diffusers' (i+1)/n > end rule)
    assert seen == [((), [0.5]), ((), [0.5]), ((1,), []), ((), []), ((1,), []), ((), []), ((1,), [])]
