"""The README's promise: image k of `--num-images N` is the single run at seed + k, bit for bit, for every sampler
(each image's initial and ancestral noise from its own generator; images sampled one at a time by default)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sampling.pipeline import GenerationParams, Pipeline
from sampling.samplers import SAMPLERS, euler_ancestral


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import os

    from sampling.embedded import embedded_model_dir

    os.environ["MMDITX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return Pipeline.from_model_dir(embedded_model_dir())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_image_k_of_a_batch_is_the_single_run_at_seed_plus_k(pipe, sampler):
    params = GenerationParams(prompt="a red cube", negative_prompt="blur", width=64, height=64, steps=3, seed=5,
                              sampler=sampler, slg=True, cfg=5.0)
    images, latents = pipe.generate(params, num_images=3, return_latents=True)
    for k in range(3):
        single, latent = pipe.generate(GenerationParams(**{**params.to_dict(), "seed": 5 + k}), return_latents=True)
        assert torch.equal(latents[k:k + 1], latent), f"{sampler}: image {k} differs from the run at seed {5 + k}"
        assert np.array_equal(np.asarray(images[k]), np.asarray(single[0]))


def test_ancestral_noise_is_per_image():
    """With one generator per image, an image's noise does not depend on its batch neighbours (the old single
    generator handed image 1 the noise image 0 would have drawn next)."""
    x = torch.zeros(3, 2, 4, 4)
    seen = []

    def denoise(x, sigma):
        return x * 0.5

    def callback(i, x, d):
        seen.append(x.clone())
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    euler_ancestral(denoise, x, sigmas, callback, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    seen_alone = []
    euler_ancestral(denoise, x[1:2], sigmas, lambda i, x, d: seen_alone.append(x.clone()),
                    generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(seen[0][1:2], seen_alone[0]) and not torch.equal(seen[0][0], seen[0][1])


def test_cli_num_images_equals_single_runs(pipe, capsys, tmp_path):
    from scripts.generate import main

    common = ["--random-weights", "--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64",
              "--sampler", "euler_ancestral", "--quiet"]
    assert main([*common, "--num-images", "2", "--seed", "4", "--out", str(tmp_path / "batch")]) == 0
    assert main([*common, "--seed", "5", "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "batch" / "000005.png")),
                          np.asarray(Image.open(tmp_path / "single" / "000005.png")))
