"""`load_mmditx`: the official single file (or a bare transformer state dict) -> a ready `MMDiTX`.

The configuration is read off the tensor shapes, the model is built on the meta device and the file's
memory-mapped tensors are assigned into it (see checkpoint.py): loading never holds two copies.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import (CheckpointError, SafetensorsFile, assign_from_file, build_on_meta, check_keys,
                         expected_shapes, open_safetensors, parse_dtype)
from .config import ConfigError, MMDiTXConfig
from .model import MMDiTX

PREFIX = "model.diffusion_model."
# Other components that may share a single file with a bare (unprefixed) transformer.
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
# Key fragments of architectures people mistake for SD3: named in the error so the user knows what they have.
FOREIGN = {
    "input_blocks.": "a UNet (Stable Diffusion 1.x/2.x/SDXL)",
    "double_blocks.": "a Flux transformer",
    "transformer_blocks.": "a diffusers-format transformer (load the original single-file checkpoint instead)",
}


def _transformer_prefix(f: SafetensorsFile) -> str:
    for prefix in (PREFIX, ""):
        if prefix + "x_embedder.proj.weight" in f and prefix + "joint_blocks.0.x_block.attn.qkv.weight" in f:
            return prefix
    keys = f.keys()
    for fragment, name in FOREIGN.items():
        if any(fragment in k for k in keys):
            raise CheckpointError(f"{f.path}: this looks like {name} checkpoint (keys such as "
                                  f"'{next(k for k in keys if fragment in k)}'), not an SD3 MMDiT(-X) model.")
    tops = sorted({k.split(".")[0] for k in keys})
    raise CheckpointError(f"{f.path}: no MMDiT transformer found: expected keys '{PREFIX}x_embedder.proj.weight' "
                          f"and '{PREFIX}joint_blocks.*' (or the same without prefix); the file's top-level names "
                          f"are {tops[:12]}. Is this sd3.5_medium.safetensors?")


def read_config(path: str | os.PathLike) -> MMDiTXConfig:
    """The configuration of the transformer in a checkpoint file, read from its header only."""
    f = open_safetensors(path)
    return _config(f, _transformer_prefix(f))


def _config(f: SafetensorsFile, prefix: str) -> MMDiTXConfig:
    try:
        return MMDiTXConfig.from_shapes(f.shapes(prefix), source=str(f.path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_mmditx(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> MMDiTX:
    """Load the transformer from `sd3.5_medium.safetensors` (keys under 'model.diffusion_model.'; the VAE and
    any text-encoder keys are ignored) or from a bare transformer state dict.

    dtype: weights are converted to it (fp32 for CPU compute; bf16/fp16 on GPU); None keeps the stored dtype.
    On CPU with the stored dtype the weights stay memory-mapped from the file (zero copy): do not modify
    or delete the file while the model is in use.
    """
    dtype = parse_dtype(dtype)
    f = open_safetensors(path)
    prefix = _transformer_prefix(f)
    config = _config(f, prefix)
    model = build_on_meta(lambda: MMDiTX(config))
    ignore = (lambda k: k.startswith(OTHER_COMPONENTS)) if prefix == "" else (lambda k: False)
    check_keys(f, prefix, expected_shapes(model), "MMDiT-X transformer", ignore_unexpected=ignore)
    return assign_from_file(model, f, prefix, dtype=dtype, device=device, check_finite=check_finite)
