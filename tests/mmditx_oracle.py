"""diffusers' SD3Transformer2DModel as an independent oracle for our MMDiT-X.

A checkpoint in the official layout is converted with diffusers' own single-file converter and loaded into
diffusers' model; the stage recorders of instruments.compare (the same ones scripts/compare.py uses) capture every
stage of both models so the tests compare layer by layer.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mmditx.diffusers_names import diffusers_sd3_kwargs  # noqa: F401
from instruments.compare import rel_error, watch_diffusers_sd3, watch_mmditx  # noqa: F401

PREFIX = "model.diffusion_model."


def diffusers_transformer(path, config):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = {k: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    ref = SD3Transformer2DModel(**diffusers_sd3_kwargs(config))
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"diffusers conversion mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    return ref.eval().float()


def run_both(ours, ref, x, t, context, y, skip_layers=()):
    """Run both models, returning {stage: (our tensor, reference tensor)} and the two outputs."""
    with watch_mmditx(ours) as a, watch_diffusers_sd3(ref) as b, torch.no_grad():
        out = ours(x, t, context=context, y=y, skip_layers=skip_layers)
        ref_out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                      timestep=torch.as_tensor(t).expand(x.shape[0]),
                      skip_layers=list(skip_layers) or None, return_dict=False)[0]
    stages = {k: (a.out[k], b.out[k]) for k in a.out if k in b.out}
    return stages, out, ref_out
