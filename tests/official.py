"""Random-weight checkpoints in the exact official layout, for tests and benchmarks.

Names and shapes come from tests/data/official_layouts.json (a copy of the listing of the official files);
values are random, drawn so that activations stay O(1) through deep stacks.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

from mmditx.checkpoint import write_safetensors_streaming

DATA = Path(__file__).parent / "data"
CLIP_TOKENIZER_DIR = DATA / "clip_tokenizer"


@lru_cache(maxsize=None)
def official_layout(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an official file. Names: 'sd3.5_medium', 'sd3.5_large', 'sd3_medium', 'clip_l',
    'clip_g', 't5xxl' (see tests/data/official_layouts.json)."""
    files = {
        "sd3.5_medium": "sd3.5_medium.safetensors",
        "sd3.5_large": "sd3.5_large.safetensors (diffusion model)",
        "sd3_medium": "sd3_medium.safetensors (diffusion model)",
        "clip_l": "clip_l.safetensors",
        "clip_g": "clip_g.safetensors",
        "t5xxl": "t5xxl_fp16.safetensors",
    }
    data = json.loads((DATA / "official_layouts.json").read_text())
    return {k: tuple(v) for k, v in data[files[name]].items()}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A plausible random value for a weight called `name`: norm gains near 1, small biases,
    matrices scaled by 1/sqrt(fan_in) so deep stacks neither explode nor vanish."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and ("norm" in name or ".ln_" in name or name.endswith("layer_norm.weight")) and leaf == "weight":
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if leaf == "bias" or len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=generator)
    if "pos_embed" in name:
        return torch.randn(shape, generator=generator) * 0.5
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    if "embedding" in name or "embed_tokens" in name or name.endswith("shared.weight"):
        fan_in = 1
    return torch.randn(shape, generator=generator) / fan_in ** 0.5


def write_random_checkpoint(
    shapes: Mapping[str, tuple[int, ...]], path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Random weights (see `random_tensor`) in `dtype`, written tensor by tensor (full sizes fit in memory)."""
    g = torch.Generator().manual_seed(seed)
    specs = {k: (tuple(s), dtype) for k, s in shapes.items()}
    write_safetensors_streaming(specs, lambda k: random_tensor(k, specs[k][0], g).to(dtype), path)
    return Path(path)


def mmditx_layout(hidden: int = 128, depth: int = 4, dual: tuple[int, ...] = (0, 1), qk_norm: bool = True,
                  pos_max: int = 16, context_dim: int = 4096, pooled_dim: int = 2048, patch: int = 2,
                  channels: int = 16, prefix: str = "model.diffusion_model.") -> dict[str, tuple[int, ...]]:
    """The official single-file layout of an MMDiT(-X) of any size, as Stability writes it (key names and
    shape rules). `test_official_layout` checks that the three real configurations reproduce the official
    listings exactly, so small test models built from it are in the true layout."""
    D, p = hidden, prefix
    out = {
        p + "pos_embed": (1, pos_max * pos_max, D),
        p + "x_embedder.proj.weight": (D, channels, patch, patch), p + "x_embedder.proj.bias": (D,),
        p + "t_embedder.mlp.0.weight": (D, 256), p + "t_embedder.mlp.0.bias": (D,),
        p + "t_embedder.mlp.2.weight": (D, D), p + "t_embedder.mlp.2.bias": (D,),
        p + "y_embedder.mlp.0.weight": (D, pooled_dim), p + "y_embedder.mlp.0.bias": (D,),
        p + "y_embedder.mlp.2.weight": (D, D), p + "y_embedder.mlp.2.bias": (D,),
        p + "context_embedder.weight": (D, context_dim), p + "context_embedder.bias": (D,),
    }

    def attn(name, pre_only=False):
        out[name + ".qkv.weight"], out[name + ".qkv.bias"] = (3 * D, D), (3 * D,)
        if not pre_only:
            out[name + ".proj.weight"], out[name + ".proj.bias"] = (D, D), (D,)
        if qk_norm:
            out[name + ".ln_q.weight"] = out[name + ".ln_k.weight"] = (64,)

    for i in range(depth):
        for stream in ("context_block", "x_block"):
            b = f"{p}joint_blocks.{i}.{stream}"
            pre_only = stream == "context_block" and i == depth - 1
            attn(b + ".attn", pre_only)
            if stream == "x_block" and i in dual:
                attn(b + ".attn2")
            if not pre_only:
                out[b + ".mlp.fc1.weight"], out[b + ".mlp.fc1.bias"] = (4 * D, D), (4 * D,)
                out[b + ".mlp.fc2.weight"], out[b + ".mlp.fc2.bias"] = (D, 4 * D), (D,)
            n = 2 if pre_only else (9 if stream == "x_block" and i in dual else 6)
            out[b + ".adaLN_modulation.1.weight"], out[b + ".adaLN_modulation.1.bias"] = (n * D, D), (n * D,)
    out[p + "final_layer.linear.weight"], out[p + "final_layer.linear.bias"] = (patch * patch * channels, D), (patch * patch * channels,)
    out[p + "final_layer.adaLN_modulation.1.weight"] = (2 * D, D)
    out[p + "final_layer.adaLN_modulation.1.bias"] = (2 * D,)
    return out
