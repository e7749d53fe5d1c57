"""Joint blocks: two streams (text `context`, image `x`) with their own weights that attend jointly.

Each stream is a `DismantledBlock` (the official name: a DiT block taken apart at the attention so two of
them can share one attention over the concatenated sequence). Per stream and block:

    shift/scale/gate = adaLN_modulation(c)                     c: (B, D) timestep + pooled-text vector
    q, k, v          = attn.qkv(modulate(norm1(s), shift, scale)), RMSNorm per head on q and k
    -- joint attention over [context ; x] --
    s = s + gate_msa * attn.proj(attention output)
    s = s + gate_mlp * mlp(modulate(norm2(s), shift_mlp, scale_mlp))

MMDiT-X adds, in the first blocks of SD3.5 Medium, a second attention `attn2` over the image tokens only
(its own modulation triplet, residual added after the joint attention). The last block's context stream is
`pre_only`: it only contributes keys/values; its output is never used.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Attention, Mlp, SelfAttention, modulate


class DismantledBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.dual_attention = dual_attention
        # LayerNorms without affine parameters: adaLN supplies the scale and shift.
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm, pre_only=pre_only)
        if dual_attention:
            self.attn2 = SelfAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        n_mod = 2 if pre_only else (9 if dual_attention else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c (B, D) -> 2, 6 or 9 (B, D) vectors, in the official order:
        shift_msa, scale_msa[, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]]."""
        return self.adaLN_modulation(c).chunk(self.adaLN_modulation[1].out_features // c.shape[-1], dim=-1)

    def pre_attention(self, s: torch.Tensor, mod: tuple[torch.Tensor, ...]):
        """s (B, L, D) -> (q, k, v) for the joint attention, and for attn2 if this block has it."""
        s_norm = self.norm1(s)
        qkv = self.attn.pre_attention(modulate(s_norm, mod[0], mod[1]))
        qkv2 = self.attn2.pre_attention(modulate(s_norm, mod[6], mod[7])) if self.dual_attention else None
        return qkv, qkv2

    def post_attention(self, s: torch.Tensor, attn_out: torch.Tensor, mod: tuple[torch.Tensor, ...],
                       attn2_out: torch.Tensor | None = None) -> torch.Tensor:
        """Residual updates after attention; attn_out (B, heads, L, head_dim) -> new s (B, L, D)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        # s + gate * f(s), each as one fused addcmul
        s = torch.addcmul(s, gate_msa.unsqueeze(1), self.attn.post_attention(attn_out))
        if self.dual_attention:
            s = torch.addcmul(s, mod[8].unsqueeze(1), self.attn2.post_attention(attn2_out))
        return torch.addcmul(s, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(s), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    """One MMDiT block: (context (B, Lc, D), x (B, Lx, D), c (B, D)) -> (context or None, x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)
        self.joint_attn = Attention()                                  # over [context ; x]
        self.x_attn2 = Attention() if dual_attention else None         # over x only

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        c_mod = self.context_block.modulation(c)
        x_mod = self.x_block.modulation(c)
        (cq, ck, cv), _ = self.context_block.pre_attention(context, c_mod)
        (xq, xk, xv), x_qkv2 = self.x_block.pre_attention(x, x_mod)

        # Joint attention over the concatenated sequence, text first (official order).
        Lc = context.shape[1]
        out = self.joint_attn(torch.cat([cq, xq], dim=2), torch.cat([ck, xk], dim=2), torch.cat([cv, xv], dim=2))
        c_out, x_out = out[:, :, :Lc], out[:, :, Lc:]
        x_out2 = self.x_attn2(*x_qkv2) if x_qkv2 is not None else None

        x = self.x_block.post_attention(x, x_out, x_mod, x_out2)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, c_out, c_mod), x
