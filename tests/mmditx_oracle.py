"""diffusers' SD3Transformer2DModel as an independent oracle for our MMDiT-X.

A checkpoint in the official layout is converted with diffusers' own single-file converter and loaded into
diffusers' model; forward hooks on both models capture every stage so the tests compare layer by layer.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

PREFIX = "model.diffusion_model."


def diffusers_transformer(path, config):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = {k: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd)
    ref = SD3Transformer2DModel(
        sample_size=config.pos_embed_max_size * config.patch_size,
        patch_size=config.patch_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        attention_head_dim=64,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_dim,
        caption_projection_dim=config.hidden_size,
        pooled_projection_dim=config.pooled_dim,
        pos_embed_max_size=config.pos_embed_max_size,
        dual_attention_layers=tuple(config.dual_attention_blocks),
        qk_norm="rms_norm" if config.qk_norm else None,
    )
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"diffusers conversion mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    return ref.eval().float()


class Recorder:
    """Forward hooks that store module outputs by name."""

    def __init__(self):
        self.out: dict[str, object] = {}
        self.handles = []

    def watch(self, name, module, pick=lambda o: o):
        self.handles.append(module.register_forward_hook(lambda m, i, o: self.out.__setitem__(name, pick(o))))

    def close(self):
        for h in self.handles:
            h.remove()


def run_both(ours, ref, x, t, context, y, skip_layers=()):
    """Run both models, returning {stage: (our tensor, reference tensor)} and the two outputs."""
    a, b = Recorder(), Recorder()
    a.watch("x_embedder", ours.x_embedder)
    b.watch("x_embedder", ref.pos_embed.proj, lambda o: o.flatten(2).transpose(1, 2))
    a.watch("context_embedder", ours.context_embedder)
    b.watch("context_embedder", ref.context_embedder)
    a.watch("t_embedder", ours.t_embedder)
    b.watch("t_embedder", ref.time_text_embed.timestep_embedder)
    a.watch("y_embedder", ours.y_embedder)
    b.watch("y_embedder", ref.time_text_embed.text_embedder)
    for i, (mine, theirs) in enumerate(zip(ours.joint_blocks, ref.transformer_blocks)):
        a.watch(f"block{i}.context", mine, lambda o: o[0])
        a.watch(f"block{i}.x", mine, lambda o: o[1])
        b.watch(f"block{i}.context", theirs, lambda o: o[0])
        b.watch(f"block{i}.x", theirs, lambda o: o[1])
    a.watch("final_layer", ours.final_layer)
    b.watch("final_layer", ref.proj_out)
    with torch.no_grad():
        out = ours(x, t, context=context, y=y, skip_layers=skip_layers)
        ref_out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                      timestep=torch.as_tensor(t).expand(x.shape[0]),
                      skip_layers=list(skip_layers) or None, return_dict=False)[0]
    a.close()
    b.close()
    stages = {k: (a.out[k], b.out[k]) for k in a.out if a.out[k] is not None and b.out.get(k) is not None}
    return stages, out, ref_out


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error relative to the output's scale."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
