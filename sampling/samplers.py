"""Samplers over a flow-matching schedule, in the k-diffusion form the official reference uses.

A sampler takes `denoise(x, sigma) -> denoised` (the clean-image estimate, see guidance.py), the starting
latent x at sigmas[0], the schedule, and returns the final latent. `callback(i, x, denoised)` is called after
each step (progress bars, previews, tracing).
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
Generators = torch.Generator | list[torch.Generator] | None


def step_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Fresh float32 CPU noise shaped like x. With a list of generators (one per image of the batch), image k's
    noise comes from generator k alone, so it does not depend on the batch it is sampled in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} images")
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return noise.to(x.device, x.dtype)


@torch.no_grad()
def euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
          generator: Generators = None) -> torch.Tensor:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * (x_i - denoised_i) / sigma_i  (the velocity, for flow models)."""
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def dpmpp_2m(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
             generator: Generators = None) -> torch.Tensor:
    """DPM-Solver++(2M), k-diffusion's `sample_dpmpp_2m`. With t = -log(sigma), h = t_next - t:
        first step and last step (sigma_next = 0):  x = (sigma_next / sigma) x - expm1(-h) denoised
        otherwise, with r = h_last / h:             d = (1 + 1/(2r)) denoised - 1/(2r) denoised_prev
                                                    x = (sigma_next / sigma) x - expm1(-h) d
    (at sigma_next = 0 the update is exactly x = denoised)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = torch.log(sigma) - torch.log(sigma_next)
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        if callback:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def euler_ancestral(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                    generator: Generators = None, eta: float = 1.0) -> torch.Tensor:
    """Euler ancestral in its rectified-flow form (ComfyUI's `sample_euler_ancestral_RF`). Per step:
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        x = (sigma_down / sigma) x + (1 - sigma_down / sigma) denoised          (deterministic step down)
        x = ((1 - sigma_next) / (1 - sigma_down)) x + c * noise                  (back up to sigma_next)
        with c = sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 / (1 - sigma_down)^2),
    so x again has the flow marginal sigma_next * noise + (1 - sigma_next) * clean. Last step: x = denoised.
    The noise comes from `generator` (on the CPU, so results do not depend on the device; see step_noise)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
            renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2).clamp_min(0).sqrt()
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised
            noise = step_noise(x, generator)
            x = (alpha_next / alpha_down) * x + renoise * noise
        if callback:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def heun(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
         generator: Generators = None) -> torch.Tensor:
    """Heun's method, k-diffusion's `sample_heun` (Karras et al. 2022, Algorithm 1): two model calls per step,
        d = (x - denoised) / sigma,  x_2 = x + d (sigma_next - sigma),  d_2 the same at (x_2, sigma_next),
        x = x + (d + d_2) / 2 (sigma_next - sigma);  the last step (sigma_next = 0) is an Euler step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        if callback:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def dpmpp_2m_sde(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None,
                 generator: Generators = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint form, for flow models: ComfyUI's `sample_dpmpp_2m_sde` with the flow
    model's half log-SNR lambda = log((1 - sigma) / sigma) and alpha = 1 - sigma. With h = lambda_next - lambda,
    g = 1 - e^(-h (1 + eta)) and, after the first step, r = h_prev / h:
        x = (sigma_next / sigma) e^(-h eta) x + alpha_next g denoised
            + alpha_next g / (2 r) (denoised - denoised_prev) + sigma_next sqrt(1 - e^(-2 h eta)) noise,
    and x = denoised on the last step. The noise comes from `generator` (on the CPU, so results do not depend
    on the device; ComfyUI draws it from a Brownian tree: the same distribution, other numbers). At sigma = 1
    (lambda = -inf) the step is its limit, x = alpha_next denoised + sigma_next noise, and the next step is
    first order; ComfyUI moves a first sigma of 1 to sigma(0.9999) instead."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x, h = denoised, None
        else:
            alpha_next = 1 - sigma_next
            if sigma >= 1:  # h = inf: e^(-h eta) = 0 (1 if eta = 0), g = 1
                h = None
                x = (0 if eta > 0 else sigma_next) * x + alpha_next * denoised
                noise_scale = sigma_next
            else:
                h = torch.log((1 - sigma_next) / sigma_next) - torch.log((1 - sigma) / sigma)
                x = (sigma_next / sigma) * torch.exp(-h * eta) * x + alpha_next * -torch.expm1(-h * (1 + eta)) * denoised
                if old_denoised is not None and h_last is not None:
                    r = h_last / h
                    x = x + 0.5 * alpha_next * -torch.expm1(-h * (1 + eta)) / r * (denoised - old_denoised)
                noise_scale = sigma_next * (-torch.expm1(-2 * h * eta)).sqrt()
            if eta > 0:
                x = x + noise_scale * step_noise(x, generator)
        old_denoised, h_last = denoised, h
        if callback:
            callback(i, x, denoised)
    return x


SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpmpp_2m": dpmpp_2m,
            "dpmpp_2m_sde": dpmpp_2m_sde}
MODEL_CALLS_PER_STEP = {"heun": 2}  # the others call the model once per step (see GuidedDenoiser.calls_per_step)


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(sorted(SAMPLERS))}") from None
