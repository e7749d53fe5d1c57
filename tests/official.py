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

from sampling.embedded import random_tensor, write_random  # noqa: F401  (random_tensor re-exported)

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


def write_random_checkpoint(
    shapes: Mapping[str, tuple[int, ...]], path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Random weights (see `random_tensor`) in `dtype`, written tensor by tensor (full sizes fit in memory)."""
    write_random(shapes, Path(path), dtype=dtype, seed=seed)
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
