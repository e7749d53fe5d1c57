"""`load_mmditx`: the official single file (or a bare transformer state dict, or a diffusers-format transformer:
a folder, its `transformer/` subfolder, a shard index or file) -> a ready `MMDiTX`.

The configuration is read off the tensor shapes, the model is built on the meta device and the file's
memory-mapped tensors are assigned into it (see checkpoint.py): loading never holds two copies.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import (CheckpointError, assign_from_file, build_on_meta, check_keys,
                         expected_shapes, open_checkpoint, parse_dtype)
from .config import ConfigError, MMDiTXConfig
from .diffusers_names import from_diffusers, is_diffusers_transformer
from .model import MMDiTX

PREFIX = "model.diffusion_model."
# Other components that may share a single file with a bare (unprefixed) transformer.
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
# Key fragments of architectures people mistake for SD3: named in the error so the user knows what they have.
FOREIGN = {
    "input_blocks.": "a UNet (Stable Diffusion 1.x/2.x/SDXL)",
    "double_blocks.": "a Flux transformer",
    "single_transformer_blocks.": "a Flux transformer (diffusers format)",
    "transformer_blocks.": "a diffusers-format transformer of another model (no 'pos_embed.pos_embed')",
}
DIFFUSERS_CLASSES = ("SD3Transformer2DModel",)


def open_transformer(path: str | os.PathLike):
    """The transformer's tensors under the official names, with the prefix they sit under: from the official
    single file, or from diffusers' format (mapped name by name as the tensors are read)."""
    f = open_checkpoint(path, "transformer", DIFFUSERS_CLASSES)
    if is_diffusers_transformer(f):
        return from_diffusers(f), ""
    return f, _transformer_prefix(f)


def _transformer_prefix(f) -> str:
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
    """The configuration of the transformer in a checkpoint, read from its header(s) only."""
    return _config(*open_transformer(path))


def _config(f, prefix: str) -> MMDiTXConfig:
    try:
        return MMDiTXConfig.from_shapes(f.shapes(prefix), source=str(f.path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_mmditx(path: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> MMDiTX:
    """Load the transformer from `sd3.5_medium.safetensors` (keys under 'model.diffusion_model.'; the VAE and
    any text-encoder keys are ignored), from a bare transformer state dict, or from a diffusers-format folder
    (the whole folder, its transformer/ subfolder, or a file or shard index in it).

    dtype: weights are converted to it (fp32 for CPU compute; bf16/fp16 on GPU); None keeps the stored dtype.
    On CPU with the stored dtype the weights stay memory-mapped from the file (zero copy): do not modify
    or delete the file while the model is in use.
    """
    dtype = parse_dtype(dtype)
    f, prefix = open_transformer(path)
    config = _config(f, prefix)
    model = build_on_meta(lambda: MMDiTX(config))
    ignore = (lambda k: k.startswith(OTHER_COMPONENTS)) if prefix == "" else (lambda k: False)
    check_keys(f, prefix, expected_shapes(model), "MMDiT-X transformer", ignore_unexpected=ignore)
    return assign_from_file(model, f, prefix, dtype=dtype, device=device, check_finite=check_finite)
