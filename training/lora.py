"""Trainable LoRA adapters on the model's own linears (Hu et al. 2021), written out: no peft.

    y = W x + b + (alpha / rank) * up(down(dropout(x)))        down (rank, in): random; up (out, rank): zeros

so training starts from the unchanged model. The fused `qkv` linears get one adapter per q, k and v
(`groups=3`: three downs and three ups, the same parameters as separate to_q/to_k/to_v adapters in diffusers
and peft); for saving, such an adapter is written as one factor of rank 3*rank with a block-diagonal up
(exactly the same product). Targets are chosen by name pattern over module paths of `MMDiTX`
(`joint_blocks.3.x_block.attn.qkv`); the presets below name the usual ones.
"""

from __future__ import annotations

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmditx.lora import LoraFactor

# Presets of target patterns (fnmatch over module paths).
TARGETS = {
    "attn": ("*.attn.qkv", "*.attn.proj"),
    "attn2": ("*.attn2.qkv", "*.attn2.proj"),
    "mlp": ("*.mlp.fc1", "*.mlp.fc2"),
    "adaln": ("*_block.adaLN_modulation.1",),
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Exposes the base `weight`/`bias` for readers."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 groups: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        if base.out_features % groups:
            raise ValueError(f"{groups} groups do not divide {base.out_features} outputs")
        self.base = base.requires_grad_(False)
        self.rank, self.groups = rank, groups
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        down = torch.empty(groups * rank, base.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # peft's default for A
        self.lora_down = nn.Parameter(down.to(w.device, w.dtype))
        self.lora_up = nn.Parameter(torch.zeros(groups, base.out_features // groups, rank, device=w.device,
                                                dtype=w.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def up_matrix(self) -> torch.Tensor:
        """(out, groups * rank): the groups' ups on the diagonal."""
        return self.lora_up[0] if self.groups == 1 else torch.block_diag(*self.lora_up)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.up_matrix() @ self.lora_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x), self.lora_down)                  # (..., groups * rank)
        return self.base(x) + self.scale * F.linear(z, self.up_matrix())


def find_targets(model: nn.Module, patterns) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def target_patterns(presets=("attn",), context: bool = True, extra=()) -> tuple[str, ...]:
    """Patterns for presets (keys of TARGETS), the text stream's modules too unless context=False."""
    unknown = set(presets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {sorted(TARGETS)} or give patterns")
    patterns = [p for name in presets for p in TARGETS[name]] + list(extra)
    return tuple(p if context else p.replace("*.", "*.x_block.", 1).replace("*_block.", "*.x_block.", 1)
                 for p in patterns)


def add_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
             patterns=target_patterns(), seed: int = 0) -> dict[str, LoRALinear]:
    """Freeze `model` and put adapters on the linears matching `patterns`; returns {module path: adapter}."""
    names = find_targets(model, patterns)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {list(patterns)}")
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        groups = 3 if attr == "qkv" else 1
        adapters[name] = LoRALinear(base, rank, alpha, dropout, groups=groups, generator=g)
        setattr(parent, attr, adapters[name])
    return adapters


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear back (for a full checkpoint)."""
    for name, m in lora_modules(model).items():
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the plain linears back, adapters discarded."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, m.base)
    return model


def lora_factors(model: nn.Module) -> dict[str, LoraFactor]:
    """{module path: LoraFactor(down (R, in), up (out, R), alpha)} with R = groups * rank: the same product
    alpha/R * up @ down as the adapter (alpha scaled by the groups), in the form mmditx.lora writes."""
    return {name: LoraFactor(down=m.lora_down.detach().float().cpu(), up=m.up_matrix().detach().float().cpu(),
                             alpha=m.alpha * m.groups)
            for name, m in lora_modules(model).items()}
