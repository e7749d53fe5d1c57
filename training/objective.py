"""The training objective of SD3 (rectified flow, Esser et al. 2024, section 2 and 3.1).

    sigma ~ p(sigma)                         logit-normal (default), uniform or "mode", then the resolution shift
    x_t    = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                      the velocity the model predicts (sampling/schedule.py runs it backwards)
    loss   = mean over the image of  w(sigma) * (model(x_t, 1000 * sigma) - target)^2,  mean over the batch

The timestep densities and loss weights are those of diffusers' `training_utils` (tested against it).
Caption dropout zeroes each text encoder's share of the conditioning independently (SD3 paper, 46.3% per
encoder there), so the model also learns the unconditional prediction that classifier-free guidance needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sampling.schedule import flow_sigma

SAMPLING_SCHEMES = ("logit_normal", "uniform", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
REFERENCE_AREA = 1024 * 1024  # SD3.5's shift 3.0 is for 1024x1024 images


@dataclass(frozen=True)
class Objective:
    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29          # the SD3 paper's s for "mode" sampling
    shift: float | None = 3.0         # None: resolution-dependent, see resolution_shift
    weighting: str = "none"
    random_pos_crop: bool = True      # SD3.5: a random window of the positional table, not the center one
    merge_repeated_context: bool = False  # compute T5-off's 77 zero tokens once (exact): merge_repeated_context

    def __post_init__(self):
        if self.sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sigma sampling must be one of {SAMPLING_SCHEMES}, not {self.sampling!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, not {self.weighting!r}")


def sample_u(objective: Objective, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch,) times in (0, 1) from the chosen density, before the shift."""
    if objective.sampling == "logit_normal":
        u = torch.normal(objective.logit_mean, objective.logit_std, size=(batch,), generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(batch, generator=generator)
    if objective.sampling == "mode":  # density with a mode in the middle, heavier tails for s < 0
        u = 1 - u - objective.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def resolution_shift(height: int, width: int, base_shift: float = 3.0) -> float:
    """SD3 paper eq. 23: shifting sigma by sqrt(m / n) keeps the signal-to-noise ratio per image area;
    the reference is SD3.5's shift 3.0 at 1024x1024."""
    return base_shift * math.sqrt(height * width / REFERENCE_AREA)


def sample_sigmas(objective: Objective, batch: int, image_size: tuple[int, int],
                  generator: torch.Generator | None = None) -> torch.Tensor:
    shift = objective.shift if objective.shift is not None else resolution_shift(*image_size)
    return flow_sigma(sample_u(objective, batch, generator), shift).float()


def loss_weight(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight (SD3 paper section 3.1): sigma^-2 ("sigma_sqrt"), the cosine map, or 1."""
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def noisy_latent(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def random_pos_offset(model_config, latent_hw: tuple[int, int], generator: torch.Generator | None):
    """(top, left) of a random window of the positional table for a latent of this size (in patches)."""
    p, m = model_config.patch_size, model_config.pos_embed_max_size
    h, w = latent_hw[0] // p, latent_hw[1] // p
    top = int(torch.randint(0, m - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, m - w + 1, (1,), generator=generator))
    return top, left


@dataclass
class Draw:
    """The randomness of one training batch: noise levels, noise, positional-crop offset (None: center)."""
    sigmas: torch.Tensor                   # (B,)
    noise: torch.Tensor                    # like x0
    offset: tuple[int, int] | None

    def shard(self, start: int, stop: int) -> "Draw":
        return Draw(self.sigmas[start:stop], self.noise[start:stop], self.offset)


def draw(objective: Objective, model_config, x0_shape, generator: torch.Generator | None = None) -> Draw:
    """Sigmas, noise and the crop for a batch of latents of `x0_shape`, from `generator` (a CPU generator, so a
    seed gives the same batch on every device and every number of processes)."""
    B, _, h, w = x0_shape
    sigmas = sample_sigmas(objective, B, (8 * h, 8 * w), generator)
    noise = torch.randn(tuple(x0_shape), generator=generator)
    offset = random_pos_offset(model_config, (h, w), generator) if objective.random_pos_crop else None
    return Draw(sigmas, noise, offset)


def merge_repeated_context(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L, Dc) -> (B, L - n + 1, Dc) and (L - n + 1,) repeats, where the last n tokens are the same vector in
    every sample (n > 1): SD3 without T5 pads its 77 T5 tokens with zeros. They stay equal through the model,
    so MMDiTX.forward(context_repeats=...) computes them once, exactly (for the demo, 154 -> 78 context tokens).
    (context, None) when there is nothing to merge."""
    same = (context == context[:, -1:]).flatten(2).all(-1).all(0)              # (L,) equal to the last token
    n = int(same.flip(0).cumprod(0).sum())                                    # length of the trailing run
    if n < 2:
        return context, None
    L = context.shape[1]
    repeats = torch.ones(L - n + 1, dtype=torch.float32)
    repeats[-1] = n
    return context[:, :L - n + 1], repeats


def flow_matching_loss(model, objective: Objective, x0: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                       d: Draw, where: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted mean squared velocity error of `model` on model-space latents x0 (B, C, h, w).
    where: optional (B, 1, h, w) weights of the latent positions (a masked loss, as kohya's `--masked_loss`):
    each sample's error is their weighted mean."""
    x0 = x0.float()
    sigmas, noise = d.sigmas.to(x0.device), d.noise.to(x0.device)
    context, repeats = merge_repeated_context(context) if objective.merge_repeated_context else (context, None)
    extra = {} if repeats is None else {"context_repeats": repeats}
    pred = model(noisy_latent(x0, noise, sigmas), sigmas * 1000, context, y, pos_offset=d.offset, **extra)
    error = F.mse_loss(pred.float(), noise - x0, reduction="none")                 # (B, C, h, w)
    if where is None:
        per_sample = error.flatten(1).mean(1)
    else:
        where = where.to(error).expand_as(error)
        per_sample = (error * where).flatten(1).sum(1) / where.flatten(1).sum(1)
    return (loss_weight(objective.weighting, sigmas) * per_sample).mean()


# -- caption dropout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConditioningLayout:
    """Where each text encoder's output sits in (context, pooled) (encoders/conditioning.py): CLIP-L and
    CLIP-G side by side in the first 77 tokens and in the pooled vector, T5 in the tokens after."""
    clip_l_width: int = 768
    clip_g_width: int = 1280
    clip_tokens: int = 77

    @classmethod
    def of(cls, conditioner) -> "ConditioningLayout":
        """The layout of an encoders.TextConditioner's output (its CLIPs' widths)."""
        return cls(clip_l_width=conditioner.clip_l.config.width, clip_g_width=conditioner.clip_g.config.width)


def drop_captions(context: torch.Tensor, pooled: torch.Tensor, rates: tuple[float, float, float],
                  layout: ConditioningLayout = ConditioningLayout(), generator: torch.Generator | None = None):
    """Zero CLIP-L's, CLIP-G's and T5's share independently per sample with probabilities `rates`
    (the SD3 reference's unconditional-guidance dropout zeroes an encoder's embedding). Returns new tensors."""
    if not any(rates):
        return context, pooled
    B = context.shape[0]
    keep = (torch.rand(B, 3, generator=generator) >= torch.tensor(rates)).to(context.device)
    L, G, n = layout.clip_l_width, layout.clip_g_width, layout.clip_tokens
    ctx_mask = torch.ones(B, context.shape[1], context.shape[2], dtype=context.dtype, device=context.device)
    pool_mask = torch.ones_like(pooled)
    ctx_mask[:, :n, :L] *= keep[:, 0, None, None]
    ctx_mask[:, :n, L:L + G] *= keep[:, 1, None, None]
    ctx_mask[:, n:, :] *= keep[:, 2, None, None]
    pool_mask[:, :L] *= keep[:, 0, None]
    pool_mask[:, L:L + G] *= keep[:, 1, None]
    return context * ctx_mask, pooled * pool_mask
