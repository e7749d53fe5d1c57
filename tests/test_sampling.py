"""Schedule, samplers and guidance against diffusers' scheduler and against formulas written out here."""

import math

import pytest
import torch

from sampling.guidance import GuidedDenoiser, SkipLayerGuidance
from sampling.samplers import SAMPLERS, dpmpp_2m, euler, euler_ancestral, get_sampler
from sampling.schedule import img2img_sigmas, initial_noise, noise_latent, sigmas


@pytest.mark.parametrize("steps", [1, 4, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_matches_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    assert torch.allclose(sigmas(steps, shift), sch.sigmas.float(), atol=1e-6, rtol=0)


def test_schedule_values_of_design_doc():
    s = sigmas(10, 3.0)
    assert len(s) == 11 and s[0] == 1.0 and s[-1] == 0
    assert [round(v, 4) for v in (s[1].item(), s[-3].item(), s[-2].item())] == [0.9601, 0.2780, 0.0089]


def test_euler_steps_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(12)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    target = torch.randn(2, 16, 8, 8, generator=g)

    def velocity(x, sigma):  # a stand-in model whose velocity depends on x and sigma
        return 0.7 * x - target * (1 + sigma)

    x = x0.clone()
    for t in sch.timesteps:
        sigma = t / 1000
        x = sch.step(velocity(x, sigma), t, x).prev_sample
    ours = euler(lambda x, s: x - velocity(x, s) * s, x0.clone(), sigmas(12, 3.0))
    assert torch.allclose(ours, x, atol=1e-5)


def affine_model(x, sigma):
    """A stand-in denoiser with a closed form: denoised = 0.5 x + sigma."""
    return 0.5 * x + sigma


def test_dpmpp_2m_against_formula():
    s = sigmas(8, 3.0).double()
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    x, prev, h_prev = x0.clone(), None, None
    for i in range(len(s) - 1):
        d = 0.5 * x + s[i]
        if s[i + 1] == 0:
            x = d
        else:
            h = math.log(s[i] / s[i + 1])
            if prev is None:
                x = (s[i + 1] / s[i]) * x + (1 - math.exp(-h)) * d
            else:
                r = h_prev / h
                x = (s[i + 1] / s[i]) * x + (1 - math.exp(-h)) * ((1 + 1 / (2 * r)) * d - prev / (2 * r))
            h_prev = h
        prev = d
    assert torch.allclose(dpmpp_2m(affine_model, x0.clone(), s), x, atol=1e-12)


def test_euler_ancestral_against_formula():
    s = sigmas(6, 3.0).double()
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    ours = euler_ancestral(affine_model, x0.clone(), s, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = x0.clone()
    for i in range(len(s) - 1):
        d = 0.5 * x + s[i]
        sn = s[i + 1]
        if sn == 0:
            x = d
            continue
        sd = sn * sn / s[i]  # eta = 1
        x = (sd / s[i]) * x + (1 - sd / s[i]) * d
        c = math.sqrt(sn ** 2 - sd ** 2 * (1 - sn) ** 2 / (1 - sd) ** 2)
        x = (1 - sn) / (1 - sd) * x + c * torch.randn(x.shape, generator=g).double()
    assert torch.allclose(ours, x, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_reach_a_constant_target(name):
    """With a model that always predicts the clean target, every sampler ends exactly on it."""
    target = torch.randn(1, 4, 5, 5)
    out = get_sampler(name)(lambda x, s: target, torch.randn(1, 4, 5, 5), sigmas(10, 3.0),
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=1e-6)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'.*dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral, heun"):
        get_sampler("ddim")


class Recorder:
    """A stand-in transformer: v = x * (1 + mean(context)) + y.mean(), minus 1 per skipped layer; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, y, skip_layers=()):
        self.calls.append((x.shape[0], tuple(skip_layers), t.tolist()))
        v = x * (1 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + y.mean(dim=1).view(-1, 1, 1, 1)
        return v - len(skip_layers)


def test_cfg_and_slg_arithmetic_and_window():
    steps, model = 50, Recorder()
    cond = (torch.full((1, 3, 8), 0.5), torch.full((1, 4), 2.0))
    uncond = (torch.zeros(1, 3, 8), torch.zeros(1, 4))
    slg = SkipLayerGuidance()
    den = GuidedDenoiser(model, cond, uncond, cfg=5.0, steps=steps, slg=slg)
    x = torch.ones(1, 2, 2, 2)
    s = torch.tensor(0.5)
    skipped_steps = []
    for step in range(steps):
        n = len(model.calls)
        out = den(x, s)
        calls = model.calls[n:]
        assert calls[0][0] == 2  # cond and uncond batched
        v_c, v_u = 1.5 * 1 + 2.0, 1.0
        v = v_u + (v_c - v_u) * 5.0
        if len(calls) == 2:
            skipped_steps.append(step)
            assert calls[1][:2] == (1, (7, 8, 9))
            v += (v_c - (v_c - 3)) * 2.5
        assert torch.allclose(out, x - v * s)
        assert calls[0][2] == [500.0, 500.0]  # t = sigma * 1000
    # official window: 0.01 * 50 < step < 0.20 * 50  ->  steps 1..9
    assert skipped_steps == list(range(1, 10))


def test_img2img_schedule_and_start():
    s = sigmas(20, 3.0)
    part = img2img_sigmas(s, 0.6)
    assert torch.equal(part, s[8:])  # int(20 * 0.4) = 8 levels skipped
    noise, latent = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.allclose(noise_latent(noise, latent, part[0]), part[0] * noise + (1 - part[0]) * latent)
    with pytest.raises(ValueError, match="denoise"):
        img2img_sigmas(s, 0.0)


def test_seeds_batch_equals_single_runs():
    batch = initial_noise([7, 8, 9], 16, 64, 48)
    assert batch.shape == (3, 16, 8, 6)
    for k, seed in enumerate([7, 8, 9]):
        single = torch.randn((1, 16, 8, 6), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(batch[k:k + 1], single)


def test_compiled_transformer_gives_the_same_latents(tmp_path):
    """Pipeline(compile=True) runs the transformer through torch.compile: same sampling, float-rounding apart."""
    from sampling.embedded import build
    from sampling.pipeline import GenerationParams, ModelFiles, Pipeline

    build(tmp_path)
    files = ModelFiles.from_dir(tmp_path, t5="off")
    params = GenerationParams(prompt="a red cube", width=64, height=64, steps=2, seed=3, sampler="euler", slg=False)
    eager = Pipeline(files).generate(params, return_latents=True)[1]
    compiled_pipe = Pipeline(files, compile=True)
    assert isinstance(compiled_pipe.transformer(), torch._dynamo.eval_frame.OptimizedModule)
    compiled = compiled_pipe.generate(params, return_latents=True)[1]
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-4 * eager.abs().max().item())
    assert not torch.equal(compiled, torch.zeros_like(compiled))
    with pytest.raises(ValueError, match="frugal"):
        Pipeline(files, memory="frugal", compile=True)
