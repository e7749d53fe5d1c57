"""`load_vae`: the VAE out of `sd3.5_medium.safetensors` (keys `first_stage_model.*`), out of a separate
VAE file (keys `encoder.*`/`decoder.*`, with or without that prefix) or out of a diffusers-format folder (its
`vae/`, names mapped as the tensors are read: vae/diffusers_names.py) -> a ready `VAE`.

The configuration (widths, levels, blocks per level, latent channels) is read off the tensor shapes; the
model is built on the meta device and the file's memory-mapped tensors are assigned into it (no second copy).
"""

from __future__ import annotations

import os
import re

import torch

from mmditx.checkpoint import (CheckpointError, assign_from_file, build_on_meta, check_keys, expected_shapes,
                               open_checkpoint, parse_dtype)

from .diffusers_names import from_diffusers, is_diffusers_vae
from .model import VAE, VAEConfig

PREFIX = "first_stage_model."
PROBE = "decoder.conv_in.weight"


def open_vae(path: str | os.PathLike):
    """The VAE's tensors under the official names, with the prefix they sit under."""
    f = open_checkpoint(path, "vae", ("AutoencoderKL",))
    if is_diffusers_vae(f):
        return from_diffusers(f), ""
    return f, _vae_prefix(f)


def _vae_prefix(f) -> str:
    for prefix in (PREFIX, ""):
        if prefix + PROBE in f and prefix + "encoder.conv_in.weight" in f:
            return prefix
    keys = f.keys()
    diffusers = next((k for k in keys if k.startswith("encoder.down_blocks.")), None)
    if diffusers is not None:
        raise CheckpointError(f"{f.path}: a diffusers-format VAE without its decoder (no 'decoder.up_blocks.*'). "
                              "The file is incomplete: fetch vae/ again.")
    for prefix in (PREFIX, ""):
        if prefix + PROBE in f:
            raise CheckpointError(f"{f.path}: the VAE decoder is there but the encoder is not (no "
                                  f"'{prefix}encoder.conv_in.weight'). Use a file with the complete VAE, "
                                  "such as sd3.5_medium.safetensors.")
    tops = sorted({k.split(".")[0] for k in keys})
    raise CheckpointError(f"{f.path}: no VAE weights found: expected '{PREFIX}{PROBE}' (or '{PROBE}' in a separate "
                          f"VAE file); the file's top-level names are {tops[:12]}. The SD3 VAE is stored in "
                          "sd3.5_medium.safetensors: pass that file.")


def config_from_shapes(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> VAEConfig:
    """Infer the VAE configuration from {name: shape} of a VAE state dict (keys `encoder.*`, `decoder.*`)."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: missing key {key!r}, needed to infer the VAE configuration")
        return tuple(shapes[key])

    if "quant_conv.weight" in shapes or "post_quant_conv.weight" in shapes:
        z = need("quant_conv.weight")[0] // 2 if "quant_conv.weight" in shapes else "?"
        raise CheckpointError(f"{source}: this VAE has quant_conv/post_quant_conv layers ({z} latent channels): it "
                              "is an SD1.x/SDXL-style VAE, not the 16-channel SD3 VAE (which has neither).")
    ch, in_channels = need("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels 'encoder.down.{{i}}' are missing or have gaps (found {levels})")
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    if not blocks:
        raise CheckpointError(f"{source}: no 'encoder.down.0.block.*' keys: cannot tell the blocks per level")
    ch_mult = []
    for i in levels:
        width = need(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if width % ch:
            raise CheckpointError(f"{source}: level {i} width {width} is not a multiple of the base width {ch}")
        ch_mult.append(width // ch)
    z2 = need("encoder.conv_out.weight")[0]
    widths = [ch * m for m in ch_mult]
    if any(w % 32 for w in widths):
        raise CheckpointError(f"{source}: channel widths {widths} are not all multiples of 32, which the "
                              "GroupNorm(32) layers of this VAE need")
    return VAEConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=len(blocks), z_channels=z2 // 2,
                     in_channels=in_channels)


def read_vae_config(path: str | os.PathLike) -> VAEConfig:
    """The VAE configuration stored in a checkpoint, read from its header(s) only."""
    f, prefix = open_vae(path)
    return config_from_shapes(f.shapes(prefix), source=str(f.path))


def load_vae(path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | str | None = torch.float32, check_finite: bool = False) -> VAE:
    """Load the SD3 VAE from `sd3.5_medium.safetensors`, a separate VAE file, or a diffusers-format folder
    (the whole folder or its vae/ subfolder).

    dtype: weights are converted to it (fp32 on CPU; bf16/fp16 on GPU), None keeps the stored dtype.
    On CPU with the stored dtype the weights stay memory-mapped from the file (zero copy): do not modify
    or delete the file while the model is in use. Other components in the same file are ignored.
    """
    dtype = parse_dtype(dtype)
    f, prefix = open_vae(path)
    config = config_from_shapes(f.shapes(prefix), source=str(f.path))
    model = build_on_meta(lambda: VAE(config))
    # Under no prefix the file may also hold a bare transformer or text encoders: only encoder./decoder. count.
    ignore = (lambda k: not k.startswith(("encoder.", "decoder."))) if prefix == "" else (lambda k: False)
    check_keys(f, prefix, expected_shapes(model), "SD3 VAE", ignore_unexpected=ignore)
    return assign_from_file(model, f, prefix, dtype=dtype, device=device, check_finite=check_finite)
