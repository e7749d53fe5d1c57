"""A ControlNet for the demo model: the canny edges of a scene steer where its shapes go and what outline they have.

The net is the official "2b" kind (mmditx/controlnet.py: its own patch embedding of the noisy latent, blocks
that all read the same tokens, control images encoded as 2x-1), with zero-initialised output projections so
that training starts from the demo model's own behaviour. The demo transformer stays frozen; the loss is the
demo's flow-matching loss with the net's outputs added to the image stream.

Judged by the demo's reader on prompts that leave out what the edges give: "a red shape on a white background"
with the edges of a star at the top: is there a star, at the top?
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from PIL import Image
from torch import nn

from mmditx.controlnet import ControlNet, ControlNetConfig, official_state_dict
from mmditx.checkpoint import save_safetensors
from sampling.control import canny_edges, control_pixels

Log = Callable[[str], None]


def demo_controlnet_config(model_config, depth: int = 4) -> ControlNetConfig:
    D = model_config.hidden_size
    return ControlNetConfig(hidden_size=D, depth=depth, patch_size=model_config.patch_size, pooled_dim=D,
                            variant="2b", own_tokens=True, chained=False, pooled_from_main=True)


def new_controlnet(model_config, depth: int = 4, seed: int = 0) -> ControlNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNet(demo_controlnet_config(model_config, depth), "canny", source="demo canny ControlNet")
    for proj in net.controlnet_blocks:   # a new net adds nothing: training starts from the model as it is
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
    return net


@torch.no_grad()
def edge_latents(vae, images: torch.Tensor, config: ControlNetConfig, batch: int = 32) -> torch.Tensor:
    """(N, 3, H, W) uint8 scenes -> (N, 16, H/8, W/8) latents of their canny edge maps (fp16)."""
    out = []
    for i in range(0, len(images), batch):
        pixels = torch.cat([control_pixels(canny_edges(Image.fromarray(im.permute(1, 2, 0).numpy())), config,
                                           "canny", im.shape[-1], im.shape[-2]) for im in images[i:i + batch]])
        out.append(vae.encode(pixels, sample=False).half())
    return torch.cat(out)


class Steered(nn.Module):
    """The frozen model with the net's outputs added, called like the model by the flow-matching loss;
    `control` holds the batch's control latents."""

    def __init__(self, model, net: ControlNet):
        super().__init__()
        self.model, self.net, self.config = model, net, model.config
        self.control: torch.Tensor | None = None

    def forward(self, x, t, context, y, pos_offset=None):
        return self.model(x, t, context=context, y=y, controls=[(self.net, self.control, 1.0)])


def train_controlnet(model, net: ControlNet, latents: torch.Tensor, controls: torch.Tensor, captions: list[str],
                     conditioner, steps: int, batch_size: int = 32, lr: float = 3e-4, caption_dropout: float = 0.1,
                     seed: int = 0, log: Log = print) -> list[dict]:
    """Train `net` in place (model frozen) on latents (N, 16, h, w), their control latents and captions."""
    from training.objective import Objective, draw, flow_matching_loss
    from training.vae import warmup_cosine

    model.requires_grad_(False)
    net.train().requires_grad_(True)
    steered = Steered(model, net)
    objective = Objective(shift=1.0, random_pos_crop=False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    history, start = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        context, pooled = conditioner.encode(prompts)
        x0 = latents[idx].float()
        steered.control = controls[idx].float()
        loss = flow_matching_loss(steered, objective, x0, context, pooled, draw(objective, model.config, x0.shape, g))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, steps, 50)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item()})
        if (step + 1) % 50 == 0 or step + 1 == steps:
            recent = [h["loss"] for h in history[-50:]]
            log(f"controlnet step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{(time.perf_counter() - start) / (step + 1):.2f} s/step")
    net.eval().requires_grad_(False)
    return history


def save_controlnet(net: ControlNet, path, dtype: torch.dtype = torch.float16) -> None:
    """The official layout, in half precision like the shipped demo model (the net is judged from this file)."""
    save_safetensors({k: v.to(dtype) if v.is_floating_point() else v  # control_type stays an integer
                      for k, v in official_state_dict(net).items()}, path)
