"""Images in and out: PIL <-> (B, 3, H, W) tensors in [-1, 1], and a fast latent preview.

Pixel conversion follows the official `sd3_infer.py`: in, x / 255 * 2 - 1; out, clamp((x + 1) / 2, 0, 1) * 255
truncated to uint8 (not rounded, so outputs match the official script's PNGs byte for byte).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

# Linear map from the 16 channels of a *model-space* latent to RGB in [-1, 1], one row per channel, and its
# bias: the SD3 latent-preview factors used by ComfyUI (comfy/latent_formats.py, class SD3), fitted there by
# least squares between latents and their decoded, downscaled images.
SD3_LATENT_RGB_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
SD3_LATENT_RGB_BIAS = (0.2394, 0.2135, 0.1925)


def image_to_tensor(images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    """PIL image(s) of one size -> (B, 3, H, W) float32 in [-1, 1]. Converted to RGB (alpha dropped)."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("image_to_tensor: no images given")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"image_to_tensor: images of different sizes {sorted(sizes)} cannot form one batch; "
                         "resize them to one size first")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]  # (H, W, 3) each
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x * 2.0 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) tensor in [-1, 1] -> list of PIL RGB images."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"tensor_to_images expects (batch, 3, height, width) in [-1, 1], got {tuple(x.shape)}")
    x = ((x.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    pixels = (255.0 * x.permute(0, 2, 3, 1).numpy()).astype(np.uint8)  # truncation, as the official script
    return [Image.fromarray(p) for p in pixels]


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) model-space latent -> (B, 3, h, w) rough RGB in [-1, 1] (one matrix product, no VAE)."""
    if latent.ndim != 4 or latent.shape[1] != len(SD3_LATENT_RGB_FACTORS):
        raise ValueError(f"latent_preview expects a (batch, 16, h, w) SD3 latent, got {tuple(latent.shape)}")
    factors = torch.tensor(SD3_LATENT_RGB_FACTORS, dtype=torch.float32, device=latent.device)  # (16, 3)
    bias = torch.tensor(SD3_LATENT_RGB_BIAS, dtype=torch.float32, device=latent.device)
    rgb = torch.einsum("bchw,cr->brhw", latent.float(), factors) + bias[None, :, None, None]
    return rgb.clamp(-1.0, 1.0)


def latent_preview(latent: torch.Tensor, upscale: int = 1) -> Image.Image:
    """A progress-display preview of the first latent in the batch: (1 or B, 16, h, w) -> PIL (w*upscale, h*upscale).
    One pixel per latent position (1/8 of the final size) unless `upscale` > 1 (nearest neighbour)."""
    if latent.ndim == 3:
        latent = latent[None]
    image = tensor_to_images(latent_to_rgb(latent[:1]))[0]
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image
