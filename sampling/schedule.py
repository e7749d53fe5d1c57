"""The discrete flow-matching schedule of SD3 (official `ModelSamplingDiscreteFlow` + `get_sigmas`).

A latent at noise level sigma is x = sigma * noise + (1 - sigma) * clean. The model predicts the velocity
v = noise - clean, so the clean estimate is denoised = x - v * sigma.
"""

from __future__ import annotations

import torch

from .defaults import DEFAULTS


def flow_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """sigma(t) = shift * t / (1 + (shift - 1) * t), t in (0, 1]: `shift` > 1 spends more steps at high noise."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def sigmas(steps: int, shift: float = DEFAULTS["shift"]) -> torch.Tensor:
    """`steps` + 1 noise levels from 1 down to 0, exactly as the official reference computes them.

    sigma_min = sigma(1/1000); `steps` timesteps evenly spaced from 1000 down to 1000 * sigma_min, each mapped
    through sigma(t / 1000) (so the shift is applied to the already-shifted end point, as the official code
    does), then a final 0. Shift 3, 10 steps: 1.0, 0.9601, ..., 0.2780, 0.0089, 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    sigma_min = flow_sigma(1 / 1000, shift)
    timesteps = torch.linspace(1000.0, 1000.0 * float(sigma_min), steps, dtype=torch.float64)
    return torch.cat([flow_sigma(timesteps / 1000, shift), torch.zeros(1, dtype=torch.float64)]).float()


def img2img_sigmas(all_sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """Image-to-image at strength `denoise` in (0, 1]: skip the first int(steps * (1 - denoise)) levels."""
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    steps = len(all_sigmas) - 1
    return all_sigmas[int(steps * (1 - denoise)):]


def noise_latent(noise: torch.Tensor, latent: torch.Tensor | None, sigma: torch.Tensor | float) -> torch.Tensor:
    """The starting point: sigma * noise + (1 - sigma) * latent (just the noise for text-to-image at sigma 1)."""
    if latent is None:
        return noise * sigma
    return sigma * noise + (1 - sigma) * latent


def initial_noise(seeds: list[int], channels: int, height: int, width: int) -> torch.Tensor:
    """(N, channels, H/8, W/8) float32 noise, image k from its own CPU generator seeded with seeds[k], so a
    seed gives the same image on every device and image k of a batch equals a single run with seeds[k]."""
    return torch.cat([
        torch.randn((1, channels, height // 8, width // 8), generator=torch.Generator("cpu").manual_seed(s),
                    dtype=torch.float32)
        for s in seeds
    ])
