"""Classifier-free guidance and skip-layer guidance (the official `CFGDenoiser` / `SkipLayerCFGDenoiser`).

The transformer predicts a velocity v; the samplers want the clean estimate denoised = x - v * sigma. Guidance
combines predictions linearly, so combining denoised estimates (as the official code does) or velocities is
the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .defaults import DEFAULTS


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SLG: on steps with start*steps < step < end*steps, add (cond - cond_with_layers_skipped) * scale.
    Defaults: the default preset's (SD3.5 Medium's official layers 7, 8, 9, scale 2.5, start 0.01, end 0.20)."""
    layers: tuple[int, ...] = DEFAULTS["slg_layers"]
    scale: float = DEFAULTS["slg_scale"]
    start: float = DEFAULTS["slg_start"]
    end: float = DEFAULTS["slg_end"]

    def active(self, step: int, steps: int) -> bool:
        """`step` counts model evaluations from 0; `steps` is the requested number of steps (the official code
        keeps the full count even when image-to-image starts later in the schedule)."""
        return self.scale > 0 and self.start * steps < step < self.end * steps


@dataclass
class GuidedDenoiser:
    """denoise(x, sigma) for the samplers: cond and uncond in one batch, CFG, optional SLG.

    model(x, t, context=, y=, skip_layers=) is the transformer (t = sigma * 1000). `cond` and `uncond` are
    (context, pooled) pairs for the same batch of images. `calls` records (step, skip pass?) for inspection.
    `calls_per_step`: model evaluations per sampler step (2 for heun), so that the SLG window counts steps.
    """
    model: object
    cond: tuple[torch.Tensor, torch.Tensor]
    uncond: tuple[torch.Tensor, torch.Tensor]
    cfg: float
    steps: int
    slg: SkipLayerGuidance | None = None
    step: int = 0
    calls: list = field(default_factory=list)
    calls_per_step: int = 1
    # ControlNets: (net, control latent, spec with .strength and .active(step, steps)) (sampling.control)
    controls: list = field(default_factory=list)

    def velocity(self, x, sigma, context, y, skip_layers=(), controlled=True):
        t = (sigma * 1000).to(torch.float32).expand(x.shape[0])
        step = self.step // self.calls_per_step
        active = [(net, latent, spec.strength) for net, latent, spec in self.controls
                  if controlled and spec.active(step, self.steps)]
        kw = {"controls": active} if active else {}
        return self.model(x, t, context=context, y=y, skip_layers=skip_layers, **kw).to(x.dtype)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        (c_ctx, c_y), (u_ctx, u_y) = self.cond, self.uncond
        if self.cfg == 1.0:  # no guidance: the uncond half would be multiplied by zero
            v = self.velocity(x, sigma, c_ctx, c_y)
            v_cond = v
        else:
            v_cond, v_uncond = self.velocity(torch.cat([x, x]), sigma, torch.cat([c_ctx, u_ctx]),
                                             torch.cat([c_y, u_y])).chunk(2)
            v = v_uncond + (v_cond - v_uncond) * self.cfg
        step = self.step // self.calls_per_step
        skip = self.slg is not None and self.slg.active(step, self.steps)
        if skip:
            # as the official SkipLayerCFGDenoiser: the skip pass runs without the ControlNets
            v_skip = self.velocity(x, sigma, c_ctx, c_y, skip_layers=self.slg.layers, controlled=False)
            v = v + (v_cond - v_skip) * self.slg.scale
        self.calls.append((step, skip))
        self.step += 1
        return x - v * sigma
