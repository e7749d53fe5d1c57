"""MMDiT-X: the SD3.5 Medium diffusion transformer, one forward pass top to bottom.

    x (B, 16, H, W) latent, t (B,) = sigma * 1000, context (B, Lc, 4096), y (B, 2048)
      -> patchify + cropped positional table        x   (B, H/2 * W/2, D)
      -> c = t_embedder(t) + y_embedder(y)           c   (B, D)
      -> context_embedder(context)                   ctx (B, Lc, D)
      -> joint blocks (skipping `skip_layers`)
      -> final adaLN layer + linear, unpatchify      v   (B, 16, H, W)  velocity prediction
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .blocks import JointBlock
from .config import MMDiTXConfig
from .controlnet import control_residuals
from .layers import PatchEmbed, TimestepEmbedder, VectorEmbedder, modulate


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiTX(nn.Module):
    # Set by mmditx.streaming.stream_weights when weights stay stored (fp16, CPU) and compute happens elsewhere.
    # Training: recompute each joint block in the backward pass instead of keeping its activations (True or
    # "full"), or "selective": keep the block's matrix products except the qkv ones (the recompute then redoes
    # only qkv, attention and the element-wise ops: measured at full size, 256x256, LoRA on attention: 0.81x the
    # full recompute's step time for +0.55 GiB peak RSS; docs/performance.md).
    gradient_checkpointing: bool | str = False

    def __init__(self, config: MMDiTXConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = VectorEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        # The table is a weight of the file (not recomputed): (1, max*max, D), cropped per input size.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max_size ** 2, D))
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm,
                       pre_only=(i == cfg.depth - 1), dual_attention=(i in cfg.dual_attention_blocks))
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)

    # -- positions -------------------------------------------------------------------------------------
    def cropped_pos_embed(self, h: int, w: int, offset: tuple[int, int] | None = None) -> torch.Tensor:
        """The (h, w) window of the stored (max, max) table at (top, left) = offset -> (1, h*w, D).
        None: the center window (inference). Training passes random offsets (SD3.5's random crop)."""
        m = self.config.pos_embed_max_size
        top, left = offset if offset is not None else ((m - h) // 2, (m - w) // 2)
        if not (0 <= top <= m - h and 0 <= left <= m - w):
            raise ValueError(f"positional crop at {(top, left)} of size {h}x{w} leaves the {m}x{m} table")
        table = self.pos_embed.view(1, m, m, -1)
        return table[:, top:top + h, left:left + w, :].reshape(1, h * w, -1)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    # -- input checks: clear errors instead of tracebacks from deep inside torch --------------------------
    def check_inputs(self, x, t, context, y) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be a latent (B, {cfg.in_channels}, H, W); got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of the patch size {p} "
                             f"(image sides multiples of {8 * p} pixels); got latent {H}x{W}")
        if max(H, W) > cfg.max_latent_size:
            raise ValueError(
                f"latent {H}x{W} is larger than the positional table allows ({cfg.max_latent_size}x"
                f"{cfg.max_latent_size} latent, i.e. images up to {8 * cfg.max_latent_size}x{8 * cfg.max_latent_size}"
                f" pixels); use a smaller size")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B={B}, tokens, {cfg.context_dim}); got {tuple(context.shape)}")
        if y.ndim != 2 or y.shape != (B, cfg.pooled_dim):
            raise ValueError(f"y must be the pooled vector (B={B}, {cfg.pooled_dim}); got {tuple(y.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a number or a (B={B},) tensor of sigma*1000; got shape {tuple(t.shape)}")
        return t

    def _checkpoint_options(self) -> dict:
        mode = self.gradient_checkpointing
        if mode in (True, "full"):
            return {}
        if mode != "selective":
            raise ValueError(f"gradient_checkpointing must be False, True, 'full' or 'selective', not {mode!r}")
        qkv_width = 3 * self.config.hidden_size

        def keep_products(ctx, op, *args, **kwargs):  # out = addmm(bias, a, b) or mm(a, b): width b.shape[-1]
            if op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) and args[-1].shape[-1] != qkv_width:
                return CheckpointPolicy.MUST_SAVE
            return CheckpointPolicy.PREFER_RECOMPUTE
        return {"context_fn": functools.partial(create_selective_checkpoint_contexts, keep_products)}

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, y: torch.Tensor,
                skip_layers=(), pos_offset: tuple[int, int] | None = None, controls=(),
                context_repeats: torch.Tensor | None = None) -> torch.Tensor:
        """pos_offset: (top, left) of the positional-table crop in patches; None (inference) is the center.
        controls: [(ControlNet, control_latent, strength), ...] (mmditx.controlnet), latents (B or 1, C, H, W).
        context_repeats: optional (Lc,) counts: context token i stands for that many identical tokens (made by
        training.objective.merge_repeated_context). Exact: identical context tokens stay identical through every
        block (context tokens have no positions), so n copies are one key whose logit is raised by log n."""
        t = self.check_inputs(x, t, context, y)
        skip = set(skip_layers)
        if not skip <= set(range(self.config.depth)):
            raise ValueError(f"skip_layers {sorted(skip)} outside the model's blocks 0..{self.config.depth - 1}")
        if context_repeats is not None and controls:
            raise ValueError("context_repeats cannot be combined with ControlNet controls; pass the full context")
        dtype = self.pos_embed.dtype                                            # the weights' (streamed: computed)
        p = self.config.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p

        pos = self.cropped_pos_embed(h, w, pos_offset)                          # (1, h*w, D)
        if not torch.is_autocast_enabled(x.device.type):                        # autocast casts inside each op:
            x, y, context = x.to(dtype), y.to(dtype), context.to(dtype)         # no full-size copy of an fp16 cache
        latent, x = x, self.x_embedder(x) + pos                                 # (B, h*w, D)
        c = self.t_embedder(t) + self.y_embedder(y)                             # (B, D)
        control = control_residuals(self, controls, latent, x, t, context, y, skip) if controls else {}
        context = self.context_embedder(context)                                # (B, Lc, D)
        key_bias = None
        if context_repeats is not None:
            key_bias = torch.cat([context_repeats.to(x.device, x.dtype).log(), x.new_zeros(h * w)]).view(1, 1, 1, -1)

        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        options = self._checkpoint_options() if recompute else {}
        for i, block in enumerate(self.joint_blocks):
            if i in skip:
                continue
            if recompute:
                context, x = checkpoint(block, context, x, c, key_bias, use_reentrant=False, **options)
            else:
                context, x = block(context, x, c, key_bias)
            if i in control:
                x = x + control[i]                                              # ControlNet residual

        x = self.final_layer(x, c)                                              # (B, h*w, p*p*C)
        return self.unpatchify(x, h, w)                                         # (B, C, H, W)
