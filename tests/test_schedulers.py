"""Sigma schedules and the heun / dpmpp_2m_sde samplers against ComfyUI's definitions written out here,
against diffusers' schedulers where they compute the same thing, and every sampler with every schedule."""

import math

import pytest
import torch

from sampling.guidance import GuidedDenoiser, SkipLayerGuidance
from sampling.samplers import MODEL_CALLS_PER_STEP, SAMPLERS, dpmpp_2m_sde, heun
from sampling.schedule import sigmas
from sampling.schedulers import (SCHEDULERS, beta_cdf, beta_ppf, exponential_sigmas, karras_sigmas, schedule)


# -- ComfyUI, written out: ModelSamplingDiscreteFlow(shift) and comfy/samplers.py's schedulers, in float32 --------
def comfy_table(shift):
    t = torch.arange(1, 1001, 1) / 1000
    return shift * t / (1 + (shift - 1) * t)  # time_snr_shift


def comfy_sigma(timestep, shift):
    t = timestep / 1000
    return shift * t / (1 + (shift - 1) * t)


def comfy_normal(steps, shift, sgm=False):
    table = comfy_table(shift)
    start, end = table[-1] * 1000, table[0] * 1000
    ts = torch.linspace(start, end, steps + 1)[:-1] if sgm else torch.linspace(start, end, steps)
    return torch.FloatTensor([float(comfy_sigma(t, shift)) for t in ts] + [0.0])


def comfy_simple(steps, shift):
    table = comfy_table(shift)
    ss = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def comfy_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho, torch.zeros(1)])


def comfy_exponential(n, sigma_min, sigma_max):
    return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp(), torch.zeros(1)])


# Table indices of ComfyUI's beta_scheduler (rint(scipy.stats.beta.ppf(1 - linspace(0, 1, steps, endpoint=False),
# 0.6, 0.6) * 999), consecutive repeats dropped), computed with scipy 1.17.1 (scipy is not in the venv).
SCIPY_BETA_INDICES = {
    10: [999, 959, 876, 765, 637, 500, 362, 234, 123, 40],
    20: [999, 986, 959, 922, 876, 823, 765, 703, 637, 569, 500, 430, 362, 296, 234, 176, 123, 77, 40, 13],
}
SCIPY_BETA_PPF = {  # scipy.stats.beta.ppf(q, a, b), scipy 1.17.1
    (0.6, 0.6): {0.01: 0.0008612388215429059, 0.1: 0.03958440558878085, 0.3: 0.23401700387523572,
                 0.7: 0.7659829961247643, 0.99: 0.9991387611784571, 0.999: 0.9999814412614826},
    (2.5, 0.7): {0.01: 0.19597479033740997, 0.3: 0.7097758912148804, 0.9: 0.9860477260295457},
}


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedules_match_comfyui_definitions(steps, shift):
    table = comfy_table(shift)
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    expected = {
        "normal": comfy_normal(steps, shift), "sgm_uniform": comfy_normal(steps, shift, sgm=True),
        "simple": comfy_simple(steps, shift), "karras": comfy_karras(steps, sigma_min, sigma_max),
        "exponential": comfy_exponential(steps, sigma_min, sigma_max),
    }
    for name, want in expected.items():
        got = schedule(name, steps, shift)
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, atol=2e-6, rtol=0), name


@pytest.mark.parametrize("steps", [10, 20])
def test_beta_schedule_matches_comfyui_with_scipy(steps):
    table = comfy_table(3.0)
    want = torch.FloatTensor([float(table[i]) for i in SCIPY_BETA_INDICES[steps]] + [0.0])
    assert torch.allclose(schedule("beta", steps, 3.0), want, atol=1e-6, rtol=0)


def test_beta_schedule_drops_repeated_levels():
    s = schedule("beta", 139, 3.0)  # the first step count where two quantiles land on the same table entry
    assert len(s) == 139 and (s[:-1] > s[1:]).all()  # 138 steps, strictly decreasing
    assert len(schedule("beta", 138, 3.0)) == 139


def test_beta_ppf_against_scipy_values_and_closed_forms():
    for (a, b), table in SCIPY_BETA_PPF.items():
        for q, want in table.items():
            assert beta_ppf(q, a, b) == pytest.approx(want, abs=1e-12)
    for q in (0.001, 0.2, 0.5, 0.77, 0.999):
        assert beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-12)  # arcsine law
        assert beta_ppf(q, 2.0, 1.0) == pytest.approx(q ** 0.5, abs=1e-12)
        assert beta_ppf(q, 1.0, 3.0) == pytest.approx(1 - (1 - q) ** (1 / 3), abs=1e-12)


def test_beta_cdf_against_quadrature():
    """I_x(0.6, 0.6) by the midpoint rule after t = u^(1/a) (which removes the singularity at 0)."""
    a = b = 0.6
    norm = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    for x in (0.05, 0.3, 0.5):
        n = 200_000
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n * x ** a
        integral = ((1 - u ** (1 / a)) ** (b - 1)).sum().item() * (x ** a / n) / a
        assert beta_cdf(x, a, b) == pytest.approx(integral / norm, abs=1e-8)
        assert beta_cdf(1 - x, a, b) == pytest.approx(1 - integral / norm, abs=1e-8)  # symmetry


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_official_and_normal_equal_diffusers(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(steps)
    for name in ("official", "normal"):
        assert torch.allclose(schedule(name, steps, 3.0), sch.sigmas.float(), atol=1e-6, rtol=0)
    assert torch.equal(schedule("official", steps, 3.0), sigmas(steps, 3.0))


@pytest.mark.parametrize("option,ours", [("use_karras_sigmas", karras_sigmas),
                                         ("use_exponential_sigmas", exponential_sigmas)])
def test_karras_and_exponential_formulas_equal_diffusers_for_its_end_points(option, ours):
    """diffusers applies the formula between 1 and the official schedule's last level (sigma(sigma(0.001)),
    0.0089 at shift 3); ComfyUI, and so our 'karras' and 'exponential', go down to sigma(0.001) = 0.0030."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, **{option: True})
    sch.set_timesteps(12)
    d = sch.sigmas.float()
    assert torch.allclose(ours(12, float(d[-2]), float(d[0])), d, atol=1e-6, rtol=0)
    assert float(d[-2]) == pytest.approx(float(sigmas(12, 3.0)[-2]), abs=1e-6)
    name = "karras" if option == "use_karras_sigmas" else "exponential"
    assert float(schedule(name, 12, 3.0)[-2]) == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), abs=1e-7)


def test_unknown_scheduler():
    with pytest.raises(ValueError, match="unknown scheduler 'cosine'.*karras"):
        schedule("cosine", 10)


# -- samplers ---------------------------------------------------------------------------------------------------
def velocity_model(target):
    return lambda x, sigma: 0.7 * x - target * (1 + sigma)


def test_heun_matches_diffusers_flow_match_heun():
    from diffusers import FlowMatchHeunDiscreteScheduler

    g = torch.Generator().manual_seed(0)
    x0, target = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    v = velocity_model(target)
    sch = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sch.set_timesteps(9)
    x = x0.clone()
    for t in sch.timesteps:
        x = sch.step(v(x, t / 1000), t, x).prev_sample
    ours = heun(lambda x, s: x - v(x, s) * s, x0.clone(), sigmas(9, 3.0))
    assert torch.allclose(ours, x, atol=1e-5)


def test_heun_against_formula():
    s = schedule("karras", 6, 3.0).double()
    x = x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    den = lambda x, sigma: 0.5 * x + sigma  # noqa: E731
    for i in range(len(s) - 1):
        d = (x - den(x, s[i])) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            x2 = x + d * (s[i + 1] - s[i])
            x = x + (d + (x2 - den(x2, s[i + 1])) / s[i + 1]) / 2 * (s[i + 1] - s[i])
    assert torch.allclose(heun(den, x0.clone(), s), x, atol=1e-12)


def comfy_dpmpp_2m_sde(den, x, s, noises, eta=1.0):
    """ComfyUI's sample_dpmpp_2m_sde (midpoint), flow model (CONST): lambda = -logit(sigma)."""
    old, h_last = None, None
    for i in range(len(s) - 1):
        d = den(x, s[i])
        if s[i + 1] == 0:
            x = d
        else:
            lam_s, lam_t = -torch.logit(s[i]), -torch.logit(s[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = s[i + 1] * lam_t.exp()
            x = s[i + 1] / s[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * d
            if old is not None:
                r = h_last / h
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (d - old)
            x = x + noises[i] * s[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        old, h_last = d, h
    return x


def test_dpmpp_2m_sde_against_comfyui_formula():
    s = schedule("karras", 8, 3.0).double()[1:]  # a schedule that starts below 1
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    den = lambda x, sigma: 0.5 * x + sigma  # noqa: E731
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x0.shape, generator=g).double() for _ in range(len(s) - 2)]
    want = comfy_dpmpp_2m_sde(den, x0.clone(), s, noises)
    assert torch.allclose(dpmpp_2m_sde(den, x0.clone(), s, generator=torch.Generator().manual_seed(3)), want,
                          atol=1e-6)


def test_dpmpp_2m_sde_first_step_at_sigma_one_is_the_limit():
    """From sigma = 1 the step is its limit: ComfyUI's formula from sigma = 1 - 1e-9 lands next to it."""
    s = schedule("beta", 6, 3.0).double()
    x0 = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    den = lambda x, sigma: 0.5 * x + sigma  # noqa: E731
    g = torch.Generator().manual_seed(4)
    noises = [torch.randn(x0.shape, generator=g).double() for _ in range(len(s) - 2)]
    ours = dpmpp_2m_sde(den, x0.clone(), s, generator=torch.Generator().manual_seed(4))
    near = s.clone()
    near[0] = 1 - 1e-9
    assert torch.allclose(ours, comfy_dpmpp_2m_sde(den, x0.clone(), near, noises), atol=1e-3)


def test_dpmpp_2m_sde_matches_diffusers_sde_dpmsolver_for_flow():
    """diffusers' DPMSolverMultistepScheduler(sde-dpmsolver++, order 2, flow sigmas) on its own schedule (which
    starts at sigma(0.999)), given the same noise."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                      algorithm_type="sde-dpmsolver++", solver_order=2)
    sch.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, target = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    v = velocity_model(target)
    g = torch.Generator().manual_seed(7)
    x = x0.clone()
    for i, t in enumerate(sch.timesteps):
        noise = torch.randn(x.shape, generator=g) if i < len(sch.timesteps) - 1 else torch.zeros_like(x)
        x = sch.step(v(x, sch.sigmas[i]), t, x, variance_noise=noise).prev_sample
    ours = dpmpp_2m_sde(lambda x, s: x - v(x, s) * s, x0.clone(), sch.sigmas.float(),
                        generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ours, x, atol=1e-4)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_with_every_schedule(sampler, scheduler):
    """A model that always predicts the clean target: every sampler ends on it on every schedule; a model
    with a closed-form denoiser stays finite."""
    target = torch.randn(1, 4, 5, 5)
    s = schedule(scheduler, 7, 3.0)
    out = SAMPLERS[sampler](lambda x, sig: target, torch.randn(1, 4, 5, 5), s,
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, target, atol=1e-5)
    out = SAMPLERS[sampler](lambda x, sig: 0.5 * x + sig, torch.randn(1, 4, 5, 5), s,
                            generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_slg_window_counts_steps_for_heun():
    """heun calls the model twice a step; the SLG window still covers sampler steps 1..9 of 50."""
    seen = []

    def model(x, t, context, y, skip_layers=()):
        return torch.zeros_like(x)

    cond = (torch.zeros(1, 3, 8), torch.zeros(1, 4))
    den = GuidedDenoiser(model, cond, cond, cfg=2.0, steps=50, slg=SkipLayerGuidance(),
                         calls_per_step=MODEL_CALLS_PER_STEP["heun"])
    heun(den, torch.zeros(1, 2, 2, 2), sigmas(50, 3.0), callback=lambda i, x, d: seen.append(i))
    skipped = sorted({step for step, skip in den.calls if skip})
    assert skipped == list(range(1, 10)) and len(den.calls) == 2 * 50 - 1
