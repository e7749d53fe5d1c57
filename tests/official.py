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

from mmditx.checkpoint import save_safetensors

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
    g = torch.Generator().manual_seed(seed)
    tensors = {k: random_tensor(k, tuple(s), g).to(dtype) for k, s in shapes.items()}
    save_safetensors(tensors, path)
    return Path(path)
