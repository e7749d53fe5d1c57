"""Validation images: fixed prompts and seeds sampled with the model being trained, as one grid PNG."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import vae as vae_lib
from mmditx.checkpoint import written_whole
from sampling.defaults import DEFAULTS
from sampling.guidance import GuidedDenoiser
from sampling.samplers import get_sampler
from sampling.schedule import initial_noise, sigmas

from .cache import CachedDataset

# A preview every N training steps, not a final image: the preset's guidance and shift, fewer steps, Euler.
VALIDATION_STEPS = 20


@contextmanager
def evaluating(model):
    """The model in eval mode inside the block (no dropout, e.g. a LoRA's), back in its own mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_latents(model, cond, uncond, seeds: list[int], size: tuple[int, int], steps: int = VALIDATION_STEPS,
                   cfg: float = DEFAULTS["cfg"], shift: float = DEFAULTS["shift"], sampler: str = "euler") -> torch.Tensor:
    """(len(seeds), C, h, w) latents for one conditioning (context (1, L, D), pooled (1, P)), the pipeline's
    noise per seed (sampling.schedule.initial_noise) and its samplers."""
    device, dtype = model.pos_embed.device, model.pos_embed.dtype
    n = len(seeds)
    as_model = [t.to(device, dtype).expand(n, *t.shape[1:]) for t in (*cond, *uncond)]
    denoiser = GuidedDenoiser(model, tuple(as_model[:2]), tuple(as_model[2:]), cfg, steps)
    x = initial_noise(seeds, model.config.in_channels, size[1], size[0]).to(device)
    with evaluating(model):
        out = get_sampler(sampler)(denoiser, x, sigmas(steps, shift).to(device), None,
                                   generator=torch.Generator("cpu").manual_seed(seeds[0]))
    return out.float()


@dataclass
class Validation:
    dataset: CachedDataset
    vae_file: Path
    prompts: list[str]
    seeds: list[int]
    size: tuple[int, int] = (512, 512)        # (width, height)
    steps: int = VALIDATION_STEPS
    cfg: float = DEFAULTS["cfg"]
    shift: float = DEFAULTS["shift"]

    def latents(self, model) -> list[torch.Tensor]:
        """One (seeds, C, h, w) tensor per prompt."""
        return [sample_latents(model, self.dataset.text(p), self.dataset.text(""), self.seeds, self.size,
                               self.steps, self.cfg, self.shift) for p in self.prompts]

    def images(self, latents: list[torch.Tensor]) -> list[list[Image.Image]]:
        """One row per prompt, one image per seed."""
        ae = vae_lib.load_vae(self.vae_file, device=latents[0].device)
        rows = [vae_lib.tensor_to_images(ae.decode(z)) for z in latents]
        del ae
        gc.collect()
        return rows

    def grid(self, model, path: str | Path, write: bool = True) -> Path | None:
        """write=False: sample only (FSDP's other processes, whose shards every forward of the sampling needs)."""
        latents = self.latents(model)
        if not write:
            return None
        rows = self.images(latents)
        w, h = rows[0][0].size
        sheet = Image.new("RGB", (w * len(self.seeds), h * len(rows)), "white")
        for r, row in enumerate(rows):
            for c, im in enumerate(row):
                sheet.paste(im, (c * w, r * h))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as tmp:
            sheet.save(tmp)
        return path
