"""Sigma schedules beside the official one, as ComfyUI computes them for flow models (`--scheduler`).

ComfyUI describes SD3 with `ModelSamplingDiscreteFlow` (shift 3): a table of 1000 noise levels
sigma_k = sigma(k / 1000), k = 1 .. 1000 (schedule.flow_sigma), so sigma_min = sigma(0.001) and sigma_max = 1.
Each schedule picks `steps` levels from 1 down towards sigma_min and appends 0:

  normal       timesteps evenly spaced from 1000 to 1000 * sigma_min, each through sigma(t / 1000): the same
               numbers as the official schedule (schedule.sigmas), which is therefore also called 'official'
  sgm_uniform  as normal over steps + 1 points, the last one dropped
  simple       every (1000 / steps)-th entry of the table, from the top
  karras       Karras et al. (2022), rho = 7, between sigma_min and sigma_max
  exponential  evenly spaced in log sigma between sigma_max and sigma_min
  beta         the table entries at the Beta(0.6, 0.6) quantiles of 1 - i/steps (Lee et al. 2024, "Beta
               Sampling is All You Need"): dense at both ends. Repeated entries are dropped, so a long
               schedule can have fewer than `steps` steps, as in ComfyUI.

diffusers' FlowMatchEulerDiscreteScheduler(use_karras_sigmas / use_exponential_sigmas) uses the same formulas
but ends at the official schedule's last level (sigma(sigma_min), 0.0089 at shift 3) instead of sigma_min
(0.0030): the end points here are ComfyUI's.
"""

from __future__ import annotations

import math

import torch

from .defaults import DEFAULTS
from .schedule import flow_sigma, sigmas as official_sigmas

TIMESTEPS = 1000  # entries in the model's table of noise levels (ComfyUI's ModelSamplingDiscreteFlow)
BETA_ALPHA = BETA_BETA = 0.6  # ComfyUI's beta scheduler defaults


def flow_table(shift: float) -> torch.Tensor:
    """(1000,) float64: sigma(k / 1000) for k = 1 .. 1000, ascending (sigma_min first, 1 last)."""
    return flow_sigma(torch.arange(1, TIMESTEPS + 1, dtype=torch.float64) / TIMESTEPS, shift)


def _with_zero(levels) -> torch.Tensor:
    levels = torch.as_tensor(levels, dtype=torch.float64)
    return torch.cat([levels, levels.new_zeros(1)]).float()


def sgm_uniform(steps: int, shift: float) -> torch.Tensor:
    sigma_min = float(flow_table(shift)[0])
    timesteps = torch.linspace(TIMESTEPS, TIMESTEPS * sigma_min, steps + 1, dtype=torch.float64)[:-1]
    return _with_zero(flow_sigma(timesteps / TIMESTEPS, shift))


def simple(steps: int, shift: float) -> torch.Tensor:
    table = flow_table(shift)
    stride = len(table) / steps  # a float, truncated per index as in ComfyUI
    return _with_zero(table[[len(table) - 1 - int(i * stride) for i in range(steps)]])


def karras(steps: int, shift: float) -> torch.Tensor:
    table = flow_table(shift)
    return karras_sigmas(steps, float(table[0]), float(table[-1]))


def exponential(steps: int, shift: float) -> torch.Tensor:
    table = flow_table(shift)
    return exponential_sigmas(steps, float(table[0]), float(table[-1]))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def beta(steps: int, shift: float, alpha: float = BETA_ALPHA, beta_: float = BETA_BETA) -> torch.Tensor:
    table = flow_table(shift)
    last = len(table) - 1
    picked = []
    for i in range(steps):
        # the ppf is found by bisection: round away its last bits so that they cannot decide a tie (499.5)
        index = round(round(beta_ppf(1 - i / steps, alpha, beta_) * last, 9))
        if not picked or index != picked[-1]:
            picked.append(index)
    return _with_zero(table[picked])


def beta_ppf(q: float, a: float, b: float) -> float:
    """The inverse CDF of the Beta(a, b) distribution at q in [0, 1], by bisection on `beta_cdf` (float64;
    written here so that the library does not need scipy for one function)."""
    if q <= 0:
        return 0.0
    if q >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b): the continued fraction of Numerical Recipes
    (section 6.4, evaluated with Lentz's method), on the side of x where it converges fast."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1 - math.exp(log_front) * _beta_continued_fraction(1 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float, tiny: float = 1e-300) -> float:
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-16:
            break
    return result


SCHEDULERS = {"official": official_sigmas, "normal": official_sigmas, "sgm_uniform": sgm_uniform,
              "simple": simple, "karras": karras, "exponential": exponential, "beta": beta}


def schedule(name: str, steps: int, shift: float = DEFAULTS["shift"]) -> torch.Tensor:
    """`steps` + 1 noise levels (fewer for 'beta' when entries repeat) from the top down to a final 0."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    return SCHEDULERS[name](steps, shift)
