"""Training the SD3 autoencoder (vae.VAE): reconstruction + a small KL term, then the latent scale fixed.

The loss per image is   L1(x, x') + MSE(x, x') + kl_weight * KL(q(z|x) || N(0, 1))   with z drawn by the
reparameterisation trick (the encoder's mean and log-variance, as `VAE.encode` samples), optionally with each
pixel's L1 + MSE weighted (object pixels counted more: `train_vae`'s `objects`, `train_decoder`). No adversarial or
perceptual term: the demo's images are flat colours on plain backgrounds, where pixel losses suffice (the
SD3 VAE itself was trained with LPIPS and a GAN loss on photographs).

SD3's transformer reads latents as (z - 0.0609) * 1.5305 (vae.model.SCALE_FACTOR, SHIFT_FACTOR), constants of
the official VAE. Rather than store other constants for a new VAE, `match_latent_scale` rescales what a
trained encoder emits (and what the decoder reads) so that the official constants give unit variance: the
model then loads and samples through the one official path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vae import VAE
from vae.model import LOGVAR_RANGE


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    seed: int = 0


def pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 pixels -> float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR multiplier at step `step` (0-based) of `steps`: a linear warm-up over `warmup` steps times one cosine
    from 1 to 0 over all the steps (the VAE's and the demo ControlNet's schedule)."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def vae_loss(vae: VAE, images: torch.Tensor, generator: torch.Generator | None, kl_weight: float,
             weight: torch.Tensor | None = None):
    """images (B, 3, H, W) in [-1, 1] -> (loss, reconstruction (B, 3, H, W)), with gradients; `weight` as in
    pixel_loss."""
    mean, logvar = vae.encoder(images).chunk(2, dim=1)                    # (B, 16, H/8, W/8) each
    logvar = logvar.clamp(*LOGVAR_RANGE)
    noise = torch.randn(mean.shape, generator=generator).to(mean)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = vae.decoder(z)                                                # (B, 3, H, W)
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    return pixel_loss(recon, images, weight) + kl_weight * kl, recon


def pixel_loss(recon: torch.Tensor, images: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 + MSE of `recon` against `images` (B, 3, H, W), averaged over pixels; `weight` (B, 1, H, W), if given,
    weighs each pixel's term (the mean of the weighted sum)."""
    if weight is None:
        return F.l1_loss(recon, images) + F.mse_loss(recon, images)
    error = recon - images
    return (weight * (error.abs() + error.square())).mean()


def object_weights(objects: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) float: 1 on the background, `object_weight` on the object pixels `objects` (bool)."""
    return 1 + (object_weight - 1) * objects.float()


def object_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: the pixels of `images` (N, 3, H, W) uint8 more than 8 away from the image's corner in
    some channel: an object, on a plain background whose colour the corner holds."""
    return (images.int() - images[:, :, :1, :1].int()).abs().amax(1, keepdim=True) > 8


def optimise(parameters, config: VAETrainConfig, batch_loss: Callable[[torch.Generator], torch.Tensor],
             name: str, log: Callable[[str], None] | None = None, every: int = 50) -> list[dict]:
    """`config.steps` AdamW steps (warm-up and cosine, gradients clipped) on the loss `batch_loss(generator)`
    of a batch it draws with the seeded generator it is handed. Returns the log: step, loss, seconds."""
    g = torch.Generator().manual_seed(config.seed)
    parameters = list(parameters)
    opt = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, config.steps, config.warmup_steps))
    history, start = [], time.perf_counter()
    for step in range(config.steps):
        loss = batch_loss(g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item(), "time": round(time.perf_counter() - start, 2)})
        if log and ((step + 1) % every == 0 or step + 1 == config.steps):
            recent = history[-every:]
            log(f"{name} step {step + 1}/{config.steps}  loss {sum(r['loss'] for r in recent) / len(recent):.4f}  "
                f"{history[-1]['time'] / (step + 1):.2f} s/step")
    return history


def train_vae(vae: VAE, images: torch.Tensor, config: VAETrainConfig = VAETrainConfig(),
              log: Callable[[str], None] | None = None, every: int = 50, objects: torch.Tensor | None = None,
              object_weight: float = 1.0) -> list[dict]:
    """Train `vae` in place on `images` (N, 3, H, W) uint8; batches drawn at random (seeded). With `objects`
    (N, 1, H, W) bool, the object pixels of `images` (object_pixels of the uncropped scenes), those pixels count
    `object_weight` times in the loss, as in train_decoder. Returns the log."""
    vae.train().requires_grad_(True)
    with torch.no_grad():   # start with little posterior noise (std 0.05): the decoder first learns to decode
        vae.encoder.conv_out.bias[vae.config.z_channels:].fill_(-6.0)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=g)
        weight = None if objects is None else object_weights(objects[idx], object_weight)
        return vae_loss(vae, pixels_to_unit(images[idx]), g, config.kl_weight, weight)[0]

    history = optimise(vae.parameters(), config, batch_loss, "vae", log, every)
    vae.eval().requires_grad_(False)
    return history


def train_decoder(vae: VAE, latents: torch.Tensor, images: torch.Tensor, config: VAETrainConfig,
                  object_weight: float = 5.0, crop: int = 8, log: Callable[[str], None] | None = None,
                  every: int = 50) -> list[dict]:
    """Fine-tune the decoder alone, in place: `latents` (N, 16, h, w) model-space encoder means of `images`
    (N, 3, 8h, 8w) uint8. The encoder, and so every latent already made with it, stays as it is (Stability's
    ft-MSE decoder for SD kept its latent space the same way). Each sample is a random `crop` x `crop` window of
    latent cells and its pixels; the loss is L1 + MSE with the pixels that differ from the image's corner (an
    object, on a plain background) counted `object_weight` times: the background fills most of a scene, and a
    plain mean spends the steps on it. Returns the log."""
    f, (h, w) = vae.config.downscale, latents.shape[-2:]
    vae.decoder.train().requires_grad_(True)

    def batch_loss(g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=g)
        top = torch.randint(0, h - crop + 1, (), generator=g).item()
        left = torch.randint(0, w - crop + 1, (), generator=g).item()
        z = vae.to_vae_latent(latents[idx, :, top:top + crop, left:left + crop].float())
        pixels = images[idx, :, top * f:(top + crop) * f, left * f:(left + crop) * f]
        away = object_pixels(images[idx])[:, :, top * f:(top + crop) * f, left * f:(left + crop) * f]
        return pixel_loss(vae.decoder(z), pixels_to_unit(pixels), object_weights(away, object_weight))

    history = optimise(vae.decoder.parameters(), config, batch_loss, "decoder", log, every)
    vae.decoder.eval().requires_grad_(False)
    return history


@torch.no_grad()
def match_latent_scale(vae: VAE, images: torch.Tensor, batch_size: int = 64) -> float:
    """Rescale the encoder's mean output by `a` (and the decoder's input by 1/a) so that the model-space
    latents (a * mean - shift) * scale of `images` (N, 3, H, W) uint8 have unit standard deviation.

    Exact for the decoder (its first convolution sees the same values: zero padding stays zero, as no shift
    is folded); the log-variance moves by 2 log a, so sampled latents scale alike. Returns a."""
    c = vae.config
    means = torch.cat([vae.encoder(pixels_to_unit(images[i:i + batch_size]))[:, :c.z_channels]
                       for i in range(0, len(images), batch_size)])
    a = 1.0 / (c.scale_factor * means.std().item())
    out = vae.encoder.conv_out
    out.weight[:c.z_channels] *= a
    out.bias[:c.z_channels] *= a
    out.bias[c.z_channels:] += 2 * math.log(a)
    vae.decoder.conv_in.weight /= a
    return a
