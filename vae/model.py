"""The SD3 autoencoder: an LDM-style convolutional encoder and decoder around a 16-channel latent.

    image (B, 3, H, W) in [-1, 1]
      -> Encoder -> moments (B, 32, H/8, W/8) = mean ++ log-variance     (no quant_conv in SD3)
      -> vae latent = mean (+ std * noise)
      -> model latent = (vae latent - 0.0609) * 1.5305                     (what the transformer sees)
    model latent -> vae latent = model latent / 1.5305 + 0.0609
      -> Decoder -> image (B, 3, H, W)                                      (no post_quant_conv)

Module attribute names are the official checkpoint's (`encoder.down.1.block.0.nin_shortcut`,
`decoder.mid.attn_1.q`, ...) so `first_stage_model.encoder.*` / `decoder.*` load without renaming.
The official code (Stability-AI/sd3.5 `sd3_impls.py`) is the semantics we follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tiling import tiled as run_tiled

# The SD3 latent format: the transformer works on (z - shift) * scale, which has roughly unit variance.
SCALE_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609
LOGVAR_RANGE = (-30.0, 20.0)  # the encoder's log-variance is clamped before use (official and diffusers)


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128                                 # width of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)       # one entry per resolution; all but the last halve H, W
    num_res_blocks: int = 2                       # encoder blocks per level (the decoder has one more)
    z_channels: int = 16                          # latent channels (the encoder emits twice as many)
    in_channels: int = 3                          # image channels in and out
    scale_factor: float = SCALE_FACTOR
    shift_factor: float = SHIFT_FACTOR

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each side (8 for SD3)."""
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU on the fresh GroupNorm output: one full-resolution tensor fewer at the peak.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (only in the mid block, at the latent resolution).
    q, k, v and the output projection are 1x1 convolutions, as stored in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C); fused, never forms the (HW)^2 matrix on CPU
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: pad one zero row/column at the bottom/right only, then a 3x3 stride-2 conv (no padding).
    The asymmetric pad is the official one; a symmetric padding=1 conv would shift the output by half a pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution (`mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: `block.{j}` ResNet blocks, then (except at the last level) `downsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels)
                                   for j in range(num_blocks))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `block.{j}` ResNet blocks, then (except at level 0) `upsample`."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if j == 0 else out_channels, out_channels)
                                   for j in range(num_blocks))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, 2 * z_channels, H/8, W/8) moments: mean ++ log-variance."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(config.ch if i == 0 else widths[i - 1], widths[i], config.num_res_blocks, downsample=i < levels - 1)
            for i in range(levels))
        self.mid = MidBlock(widths[-1])
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                         # (B, ch, H, W)
        for level in self.down:
            h = level(h)                            # (B, ch*mult[i], H/2^i/2, W/2^i/2); no downsample at the last
        h = self.mid(h)                             # (B, ch*mult[-1], H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, 2z, H/8, W/8)


class Decoder(nn.Module):
    """(B, z_channels, h, w) vae latent -> (B, 3, 8h, 8w) image (not clamped).

    `up` is indexed by resolution like the encoder's `down` (up.0 is full resolution) but runs from the
    last index to 0, which is why the checkpoint's `decoder.up.3` is the first to be applied."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, levels - 1)], widths[i], config.num_res_blocks + 1, upsample=i > 0)
            for i in range(levels))
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))               # (B, ch*mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)                            # level i: (B, ch*mult[i], ...), doubled by its upsample if i > 0
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, 3, 8h, 8w)


# Tiling: images of more than 1024x1024 pixels in area (the SD3.5 native size, a 128x128 latent) are tiled
# automatically, so native-size decodes are exact and larger ones run in bounded memory (decode peak RSS is about
# 1.5 GiB with tiles whatever the size, against 4.3 GiB untiled at 1024x1024; see scripts/measure_vae_memory.py).
# Tiles are at most 64x64 latent positions (512x512 pixels), overlap by at least 16 (128 pixels) and are spread
# evenly over the image; see tiling.py.
AUTO_TILE_LATENT_AREA = 128 * 128
TILE = 64
TILE_OVERLAP = 16


class VAE(nn.Module):
    """The SD3 autoencoder. `encoder` and `decoder` carry the official names; `encode`/`decode` speak the
    transformer's latent space (scale/shift applied here), images are (B, 3, H, W) in [-1, 1]."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # -- latent format ---------------------------------------------------------------------------------
    def to_model_latent(self, vae_latent: torch.Tensor) -> torch.Tensor:
        return (vae_latent - self.config.shift_factor) * self.config.scale_factor

    def to_vae_latent(self, model_latent: torch.Tensor) -> torch.Tensor:
        return model_latent / self.config.scale_factor + self.config.shift_factor

    # -- decoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latent: torch.Tensor, tiled: bool | None = None, tile: int = TILE,
               overlap: int = TILE_OVERLAP) -> torch.Tensor:
        """(B, 16, h, w) model-space latent -> (B, 3, 8h, 8w) image in [-1, 1] (float32).

        tiled: None picks tiles when h * w > 128 * 128 (more pixels than 1024x1024); True/False force it.
        tile/overlap: tile size and overlap in latent positions (64 and 16 = 512 and 128 pixels)."""
        self._check_latent(latent)
        z = self.to_vae_latent(latent.to(self._device, self._dtype))
        h, w = z.shape[-2:]
        if self._use_tiles(tiled, h * w, tile, overlap):
            image = run_tiled(self.decoder, z, grid=(h, w), tile=tile, overlap=overlap, in_scale=1,
                              out_scale=self.config.downscale, out_channels=self.config.in_channels)
        else:
            image = self.decoder(z)
        return image.float().clamp_(-1.0, 1.0)

    # -- encoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_moments(self, image: torch.Tensor, tiled: bool | None = None, tile: int = TILE,
                       overlap: int = TILE_OVERLAP) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) image in [-1, 1] -> (mean, logvar), each (B, 16, H/8, W/8) in the VAE's own latent
        space, log-variance clamped to [-30, 20]. Tiling as in `decode` (threshold: H * W > 1024 * 1024)."""
        self._check_image(image)
        x = image.to(self._device, self._dtype)
        f = self.config.downscale
        h, w = x.shape[-2] // f, x.shape[-1] // f
        if self._use_tiles(tiled, h * w, tile, overlap):
            moments = run_tiled(self.encoder, x, grid=(h, w), tile=tile, overlap=overlap, in_scale=f,
                                out_scale=1, out_channels=2 * self.config.z_channels)
        else:
            moments = self.encoder(x)
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
               tiled: bool | None = None, tile: int = TILE, overlap: int = TILE_OVERLAP) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, 16, H/8, W/8) model-space latent (float32).

        sample=True draws mean + std * noise (the official `encode`; noise from `generator` if given),
        sample=False returns the mean (deterministic)."""
        mean, logvar = self.encode_moments(image, tiled=tiled, tile=tile, overlap=overlap)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=generator.device if generator is not None else mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return self.to_model_latent(z)

    # -- input checks ----------------------------------------------------------------------------------
    @property
    def _device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def _use_tiles(self, tiled: bool | None, latent_area: int, tile: int, overlap: int) -> bool:
        if tiled is None:
            tiled = latent_area > AUTO_TILE_LATENT_AREA
        if tiled and not (tile >= 1 and 0 <= overlap <= tile // 2):
            raise ValueError(f"tile={tile}, overlap={overlap}: need tile >= 1 and 0 <= overlap <= tile // 2 "
                             f"(latent positions; the defaults are {TILE} and {TILE_OVERLAP})")
        return tiled

    def _check_latent(self, latent: torch.Tensor) -> None:
        z = self.config.z_channels
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"decode expects a (batch, {z}, height/8, width/8) latent, got {shape}; "
                             "add a batch dimension with latent[None] if needed")
        if latent.shape[1] != z:
            raise ValueError(f"decode expects {z} latent channels, got {latent.shape[1]} (shape {tuple(latent.shape)}). "
                             "SD3 latents have 16 channels; a 4-channel latent belongs to SD1.x/SDXL.")
        if not latent.is_floating_point():
            raise ValueError(f"decode expects a floating-point latent, got {latent.dtype}")

    def _check_image(self, image: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.config.downscale
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"encode expects a (batch, {c}, height, width) image tensor in [-1, 1], got {shape}; "
                             "use vae.image_to_tensor(pil_image) to convert a PIL image")
        if image.shape[1] != c:
            raise ValueError(f"encode expects {c} image channels (RGB), got {image.shape[1]} "
                             f"(shape {tuple(image.shape)}); convert RGBA/grayscale images to RGB first")
        H, W = image.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"image size {W}x{H} (width x height) is not a positive multiple of {f}: "
                             f"crop or resize it, e.g. to {max(f, W // f * f)}x{max(f, H // f * f)}")
        if not image.is_floating_point():
            raise ValueError(f"encode expects a float image in [-1, 1], got {image.dtype}; "
                             "divide uint8 pixels by 127.5 and subtract 1 (or use vae.image_to_tensor)")
