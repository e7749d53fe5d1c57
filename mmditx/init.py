"""Weights for a model trained from scratch (DiT's `initialize_weights`, as the SD3 paper uses it).

Loading never needs this (the model is built on the meta device and the file's tensors are assigned), so it is
an explicit call, not part of `MMDiTX.__init__`:

    model = init_weights(build_on_meta(lambda: MMDiTX(config)).to_empty(device="cpu"), seed=0)

  - every linear: Xavier-uniform weight, zero bias (the patch convolution as a linear over p*p*C inputs);
  - timestep and pooled-vector MLPs: normal(0, 0.02);
  - `pos_embed`: the fixed 2-D sin-cos table over the whole (max, max) grid (stored, so crops are windows of it);
  - adaLN-Zero: every modulation's last linear and the final linear start at zero, so each block starts as
    the identity and the model's first prediction is 0;
  - RMSNorm gains: one.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm
from .model import MMDiTX


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim): [sin(pos * w), cos(pos * w)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """The (side*side, dim) table of a side x side grid, row-major: the first half of the features encodes
    the column, the second half the row (DiT's and diffusers' `get_2d_sincos_pos_embed` order)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


@torch.no_grad()
def init_weights(model: MMDiTX, seed: int = 0) -> MMDiTX:
    """Initialise every weight of `model` in place for training from scratch (see the module docstring)."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device: call model.to_empty(device=...) first")
    g = torch.Generator("cpu").manual_seed(seed)

    def fill(t: torch.Tensor, init) -> None:  # draw on the CPU generator, then copy (any device, any dtype)
        cpu = torch.empty(t.shape, dtype=torch.float32)
        init(cpu)
        t.copy_(cpu)

    for m in model.modules():
        if isinstance(m, nn.Linear):
            fill(m.weight, lambda w: nn.init.xavier_uniform_(w, generator=g))
            nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    w = model.x_embedder.proj.weight
    fill(w, lambda c: nn.init.xavier_uniform_(c.view(c.shape[0], -1), generator=g))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for mlp in (model.t_embedder.mlp, model.y_embedder.mlp):
        for i in (0, 2):
            fill(mlp[i].weight, lambda t: nn.init.normal_(t, std=0.02, generator=g))

    cfg = model.config
    model.pos_embed.copy_(sincos_2d(cfg.hidden_size, cfg.pos_embed_max_size)[None])
    for block in model.joint_blocks:
        for stream in (block.context_block, block.x_block):
            nn.init.zeros_(stream.adaLN_modulation[1].weight)
            nn.init.zeros_(stream.adaLN_modulation[1].bias)
    for layer in (model.final_layer.adaLN_modulation[1], model.final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model
