"""Two-stage (hi-res) generation on the embedded random-weight model set: the second pass is image-to-image
at the larger size, checked against the pipeline's own text-to-image and image-to-image runs."""

import numpy as np
import pytest
import torch

from sampling.embedded import build
from sampling.pipeline import GenerationParams, ModelFiles, Pipeline, hires_size


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    build(root)
    return Pipeline(ModelFiles.from_dir(root, t5="off")), root


def params(**kw):
    base = dict(prompt="a red cube", width=64, height=48, steps=3, seed=11, sampler="euler", slg=True, cfg=4.0)
    return GenerationParams(**{**base, **kw})


def test_hires_size():
    assert hires_size(params(hires_scale=1.5)) == (96, 64)   # 72 -> nearest multiple of 16
    assert hires_size(params(width=1024, height=1024, hires_scale=1.4)) == (1440, 1440)


def test_lanczos_second_pass_is_img2img_of_the_resized_first_image(pipe, tmp_path):
    pipe, _ = pipe
    first = pipe.generate(params())[0]
    first.save(tmp_path / "first.png")
    two_stage = pipe.generate(params(hires_scale=1.5, hires_denoise=0.5, hires_steps=4, hires_upscale="lanczos"))[0]
    assert two_stage.size == (96, 64)
    # the same as --init-image first.png (resized to 96x64 with Lanczos) at strength 0.5 with 4 steps
    img2img = pipe.generate(params(width=96, height=64, steps=4, init_image=str(tmp_path / "first.png"),
                                   denoise=0.5))[0]
    assert np.array_equal(np.asarray(two_stage), np.asarray(img2img))


@pytest.mark.parametrize("upscale", ["latent", "lanczos"])
def test_full_strength_second_pass_is_text_to_image_at_the_larger_size(pipe, upscale):
    """At hires_denoise 1 the second pass starts from pure noise: the first pass no longer matters."""
    pipe, _ = pipe
    _, big = pipe.generate(params(width=96, height=64), return_latents=True)
    _, two = pipe.generate(params(hires_scale=1.5, hires_denoise=1.0, hires_upscale=upscale), return_latents=True)
    assert torch.equal(two, big)


def test_latent_upscale_differs_from_lanczos_and_a_second_model_dir_is_used(pipe, tmp_path):
    pipe, root = pipe
    _, latent = pipe.generate(params(hires_scale=1.5), return_latents=True)
    _, lanczos = pipe.generate(params(hires_scale=1.5, hires_upscale="lanczos"), return_latents=True)
    assert latent.shape == lanczos.shape == (1, 16, 8, 12) and not torch.equal(latent, lanczos)
    _, same = pipe.generate(params(hires_scale=1.5, hires_model_dir=str(root)), return_latents=True)
    assert torch.equal(same, latent)  # the same weights from a second directory


@pytest.mark.parametrize("kw,message", [
    (dict(hires_scale=1.0), r"hires_scale is 1.0; it must be > 1.0"),
    (dict(hires_scale=0.5), r"hires_scale is 0.5; it must be > 1.0"),
    (dict(hires_scale=1.5, hires_denoise=0.0), r"hires_denoise is 0.0; it must be > 0.0 and <= 1.0"),
    (dict(hires_scale=1.5, hires_denoise=1.2), r"hires_denoise is 1.2; it must be > 0.0 and <= 1.0"),
    (dict(hires_scale=1.5, hires_upscale="nearest"), "hires_upscale is 'nearest'; it must be one of latent, lanczos"),
])
def test_bad_values_refused_by_the_field_table(kw, message):
    with pytest.raises(ValueError, match=message):
        params(**kw)


@pytest.mark.parametrize("kw,message", [
    (dict(width=96, hires_scale=11.0), r"makes 1056x528, larger than the positional table allows \(1024 pixels a "
                                       r"side\): use a hires_scale of at most 10.66$"),
    (dict(hires_scale=1.5, hires_model_dir="/nonexistent"), "hires model: .*does not exist"),
])
def test_bad_values_refused_before_sampling(pipe, kw, message):
    with pytest.raises(ValueError, match=message):
        pipe[0].generate(params(**kw))
