"""Tiled application of the encoder or decoder: bounded memory for large images.

The input is cut into overlapping tiles on the latent grid; each tile is processed on its own and the
outputs are blended with weights that ramp linearly from ~0 to 1 across each overlap, so neighbouring
tiles cross-fade instead of meeting at a hard edge. A tile's own error is largest at its border (zero
padding where the full image had real neighbours), exactly where its weight goes to zero.

Tiled output is an approximation of the untiled one: GroupNorm statistics and the mid-block attention
see one tile instead of the whole image. tests/test_vae_tiling.py states and checks the error bound.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def tile_layout(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(start offsets, tile length) covering [0, size) with as few tiles of at most `tile` as overlap by at least
    `overlap`; the tiles are made equal and spread evenly, so no tile is mostly overlap."""
    if size <= tile:
        return [0], size
    n = math.ceil((size - overlap) / (tile - overlap))
    length = math.ceil((size + (n - 1) * overlap) / n)  # <= tile, by the choice of n
    return [round(i * (size - length) / (n - 1)) for i in range(n)], length


def ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """(length,) blending weights: 1 inside, rising linearly over the first/last `fade` entries on the
    sides that have a neighbour. Pixel centres are used ((i + 0.5) / fade), so two complementary
    ramps over the same `fade` entries sum to exactly 1 and no weight is exactly 0."""
    w = torch.ones(length)
    if fade > 0:
        rise = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if fade_start:
            w[:fade] = torch.minimum(w[:fade], rise)
        if fade_end:
            w[-fade:] = torch.minimum(w[-fade:], rise.flip(0))
    return w


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    grid: tuple[int, int],
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    out_channels: int,
) -> torch.Tensor:
    """Apply `fn` tile by tile over a (B, C, grid_h * in_scale, grid_w * in_scale) input.

    Tiles are laid out on the latent `grid` (tile and overlap in latent positions): the decoder reads
    latent tiles (in_scale 1) and writes pixel tiles (out_scale 8); the encoder the other way round.
    Returns (B, out_channels, grid_h * out_scale, grid_w * out_scale), float32 accumulation.
    """
    B = x.shape[0]
    gh, gw = grid
    out = torch.zeros(B, out_channels, gh * out_scale, gw * out_scale, dtype=torch.float32, device=x.device)
    weight = torch.zeros(gh * out_scale, gw * out_scale, dtype=torch.float32, device=x.device)
    (rows, th), (cols, tw) = tile_layout(gh, tile, overlap), tile_layout(gw, tile, overlap)
    fade = overlap * out_scale
    for i, top in enumerate(rows):
        wy = ramp(th * out_scale, fade, fade_start=i > 0, fade_end=i < len(rows) - 1).to(x.device)
        for j, left in enumerate(cols):
            wx = ramp(tw * out_scale, fade, fade_start=j > 0, fade_end=j < len(cols) - 1).to(x.device)
            piece = x[:, :, top * in_scale:(top + th) * in_scale, left * in_scale:(left + tw) * in_scale]
            y = fn(piece).float()                    # (B, out_channels, th * out_scale, tw * out_scale)
            w = wy[:, None] * wx[None, :]
            rs = slice(top * out_scale, (top + th) * out_scale)
            cs = slice(left * out_scale, (left + tw) * out_scale)
            out[:, :, rs, cs] += y.mul_(w)
            weight[rs, cs] += w
            del y
    return out / weight
