"""Joint blocks: two streams (text `context`, image `x`) with their own weights that attend jointly.

Each stream is a `DismantledBlock` (the official name: a DiT block taken apart at the attention so two of
them can share one attention over the concatenated sequence). Per stream and block, with c (B, D) the
timestep + pooled-text vector and `mod = modulation(c)` its adaLN-Zero vectors (shift, scale, gate per branch):

    q, k, v = attn.qkv(modulate(norm1(s), mod.msa.shift, mod.msa.scale)), RMSNorm per head on q and k
    -- joint attention over [context ; x] --
    s = s + mod.msa.gate * attn.proj(attention output)
    s = s + mod.mlp.gate * mlp(modulate(norm2(s), mod.mlp.shift, mod.mlp.scale))

MMDiT-X adds, in the first blocks of SD3.5 Medium, a second attention `attn2` over the image tokens only
(its own set `mod.msa2`, residual added after the joint attention). The last block's context stream is
`pre_only`: it only contributes keys/values (shift and scale only, no gate); its output is never used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .layers import Attention, Mlp, SelfAttention, modulate


def modulation_names(pre_only: bool = False, dual_attention: bool = False) -> tuple[str, ...]:
    """The layout of a stream's adaLN output, in the checkpoint's order: (shift, scale, gate) for each branch it
    modulates, the joint attention ('msa'), the MLP ('mlp'), the second attention ('msa2', dual-attention blocks
    only); a pre-only stream has only shift_msa and scale_msa. The one definition of the layout: the block,
    instruments.tracing (names) and instruments.anatomy (sizes) read it here."""
    if pre_only:
        return ("shift_msa", "scale_msa")
    branches = ("msa", "mlp", "msa2") if dual_attention else ("msa", "mlp")
    return tuple(f"{vector}_{branch}" for branch in branches for vector in ("shift", "scale", "gate"))


class Modulation(NamedTuple):
    """adaLN-Zero for one branch: its input is shifted and scaled, its output gated (Flux's ModulationOut)."""
    shift: torch.Tensor                 # (B, D)
    scale: torch.Tensor                 # (B, D)
    gate: torch.Tensor | None = None    # (B, D); None in a pre-only stream, whose branch output is unused


class StreamModulation(NamedTuple):
    """A stream's modulation, one set per branch, in `modulation_names` order."""
    msa: Modulation                     # the joint attention
    mlp: Modulation | None = None       # None in a pre-only stream
    msa2: Modulation | None = None      # the second attention: dual-attention blocks only


def gated_residual(s: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """s + gate * branch: s, branch (B, L, D), gate (B, D) per sample, as one fused addcmul."""
    return torch.addcmul(s, gate.unsqueeze(1), branch)


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
        self.modulation_names = modulation_names(pre_only, dual_attention)   # 2, 6 or 9 vectors of size D
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, len(self.modulation_names) * dim))

    def modulation(self, c: torch.Tensor) -> StreamModulation:
        """c (B, D) -> shift, scale, gate (B, D) per branch: the adaLN output cut in threes, in the order of
        `modulation_names` (msa, mlp, msa2; a pre-only stream: msa's shift and scale)."""
        chunks = self.adaLN_modulation(c).chunk(len(self.modulation_names), dim=-1)
        return StreamModulation(*(Modulation(*chunks[i:i + 3]) for i in range(0, len(chunks), 3)))

    def pre_attention(self, s: torch.Tensor, mod: StreamModulation):
        """s (B, L, D) -> (q, k, v) for the joint attention, and for attn2 if this block has it."""
        s_norm = self.norm1(s)
        qkv = self.attn.pre_attention(modulate(s_norm, mod.msa.shift, mod.msa.scale))
        qkv2 = self.attn2.pre_attention(modulate(s_norm, mod.msa2.shift, mod.msa2.scale)) if mod.msa2 is not None else None
        return qkv, qkv2

    def post_attention(self, s: torch.Tensor, attn_out: torch.Tensor, mod: StreamModulation,
                       attn2_out: torch.Tensor | None = None) -> torch.Tensor:
        """Residual updates after attention; attn_out (B, heads, L, head_dim) -> new s (B, L, D)."""
        s = gated_residual(s, mod.msa.gate, self.attn.post_attention(attn_out))
        if mod.msa2 is not None:
            s = gated_residual(s, mod.msa2.gate, self.attn2.post_attention(attn2_out))
        return gated_residual(s, mod.mlp.gate, self.mlp(modulate(self.norm2(s), mod.mlp.shift, mod.mlp.scale)))


class JointBlock(nn.Module):
    """One MMDiT block: (context (B, Lc, D), x (B, Lx, D), c (B, D)) -> (context or None, x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 pre_only: bool = False, dual_attention: bool = False):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)
        self.joint_attn = Attention()                                  # over [context ; x]
        self.x_attn2 = Attention() if dual_attention else None         # over x only

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, key_bias: torch.Tensor | None = None):
        c_mod = self.context_block.modulation(c)
        x_mod = self.x_block.modulation(c)
        (cq, ck, cv), _ = self.context_block.pre_attention(context, c_mod)
        (xq, xk, xv), x_qkv2 = self.x_block.pre_attention(x, x_mod)

        # Joint attention over the concatenated sequence, text first (official order).
        Lc = context.shape[1]
        q, k, v = torch.cat([cq, xq], dim=2), torch.cat([ck, xk], dim=2), torch.cat([cv, xv], dim=2)
        out = self.joint_attn(q, k, v) if key_bias is None else self.joint_attn(q, k, v, key_bias)
        c_out, x_out = out[:, :, :Lc], out[:, :, Lc:]
        x_out2 = self.x_attn2(*x_qkv2) if x_qkv2 is not None else None

        x = self.x_block.post_attention(x, x_out, x_mod, x_out2)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, c_out, c_mod), x
