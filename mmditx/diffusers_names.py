"""The MMDiT-X transformer's tensor names in diffusers' format (SD3Transformer2DModel), and ours (the official file's).

One table, read both ways: loading a diffusers folder maps each of its tensors to ours while assigning from the
memory-mapped files (`from_diffusers`), and scripts/convert.py writes our tensors under diffusers' names
(`to_diffusers`). The two differences beyond names:
  - diffusers stores q, k and v as three linear layers (to_q, to_k, to_v; add_q_proj, ... for the context
    stream); the official file fuses them into one qkv product. Loading concatenates them: the one copy
    a diffusers folder costs (an attention block's q/k/v weights, transiently);
  - diffusers' AdaLayerNormContinuous (the final layer, and the last block's pre-only context stream) orders its
    modulation (scale, shift); the official one (shift, scale).
Checked against diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers` by tests/test_model_formats.py.
"""

from __future__ import annotations

from .checkpoint import CheckpointError, Rename, RenamedCheckpoint, count_indexed, to_ours, to_theirs

# A key every SD3 diffusers transformer has; Flux's diffusers transformer has single_transformer_blocks instead.
PROBE = "transformer_blocks.0.attn.to_q.weight"


def _attention(ours: str, theirs: str, q: str, k: str, v: str, out: str | None, norm_q: str, norm_k: str):
    rules = [Rename(f"{ours}.qkv.{{w}}", *(f"{theirs}.{n}.{{w}}" for n in (q, k, v))),
             Rename(f"{ours}.ln_q.weight", f"{theirs}.{norm_q}.weight"),
             Rename(f"{ours}.ln_k.weight", f"{theirs}.{norm_k}.weight")]
    if out is not None:
        rules.append(Rename(f"{ours}.proj.{{w}}", f"{theirs}.{out}.{{w}}"))
    return rules


def embedder_rules() -> list[Rename]:
    """The embedders (the SD3.5 ControlNet files use these diffusers names too, see mmditx/controlnet.py)."""
    return [
        Rename("pos_embed", "pos_embed.pos_embed"),
        Rename("x_embedder.proj.{w}", "pos_embed.proj.{w}"),
        Rename("t_embedder.mlp.0.{w}", "time_text_embed.timestep_embedder.linear_1.{w}"),
        Rename("t_embedder.mlp.2.{w}", "time_text_embed.timestep_embedder.linear_2.{w}"),
        Rename("y_embedder.mlp.0.{w}", "time_text_embed.text_embedder.linear_1.{w}"),
        Rename("y_embedder.mlp.2.{w}", "time_text_embed.text_embedder.linear_2.{w}"),
        Rename("context_embedder.{w}", "context_embedder.{w}"),
    ]


def image_stream_rules(b: str, t: str) -> list[Rename]:
    """Our image stream `b` (a DismantledBlock, with attn2 in dual-attention blocks) <- diffusers' block `t`."""
    return [
        *_attention(f"{b}.attn", f"{t}.attn", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"),
        *_attention(f"{b}.attn2", f"{t}.attn2", "to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k"),
        Rename(f"{b}.adaLN_modulation.1.{{w}}", f"{t}.norm1.linear.{{w}}"),
        Rename(f"{b}.mlp.fc1.{{w}}", f"{t}.ff.net.0.proj.{{w}}"),
        Rename(f"{b}.mlp.fc2.{{w}}", f"{t}.ff.net.2.{{w}}"),
    ]


def context_stream_rules(b: str, t: str) -> list[Rename]:
    """Our text stream `b` <- diffusers' block `t` (a full stream; see transformer_rules for the pre-only one)."""
    return [
        *_attention(f"{b}.attn", f"{t}.attn", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "norm_added_q", "norm_added_k"),
        Rename(f"{b}.adaLN_modulation.1.{{w}}", f"{t}.norm1_context.linear.{{w}}"),
        Rename(f"{b}.mlp.fc1.{{w}}", f"{t}.ff_context.net.0.proj.{{w}}"),
        Rename(f"{b}.mlp.fc2.{{w}}", f"{t}.ff_context.net.2.{{w}}"),
    ]


def transformer_rules(depth: int) -> list[Rename]:
    """The naming rules for a transformer of `depth` joint blocks (the last one's context stream is pre-only)."""
    b, t = "joint_blocks.{b}", "transformer_blocks.{b}"
    last = depth - 1
    return [
        *embedder_rules(),
        *image_stream_rules(f"{b}.x_block", t),
        # the last block's context stream is pre-only: no output projection or MLP, and a continuous norm
        Rename(f"joint_blocks.{last}.context_block.adaLN_modulation.1.{{w}}",
               f"transformer_blocks.{last}.norm1_context.linear.{{w}}", swap_halves=True),
        *context_stream_rules(f"{b}.context_block", t),
        Rename("final_layer.adaLN_modulation.1.{w}", "norm_out.linear.{w}", swap_halves=True),
        Rename("final_layer.linear.{w}", "proj_out.{w}"),
    ]


def controlnet_rules(joint: bool) -> list[Rename]:
    """diffusers' SD3ControlNetModel -> our ControlNet (mmditx/controlnet.py): the embedders as above; blocks with a
    text stream (no pre-only one) or single-stream blocks (diffusers' SD3SingleTransformerBlock, named like one
    image stream); controlnet_blocks and pos_embed_input keep their names."""
    t = "transformer_blocks.{b}"
    blocks = ([*image_stream_rules(f"{t}.x_block", t), *context_stream_rules(f"{t}.context_block", t)] if joint
              else image_stream_rules(t, t))
    return [*embedder_rules(), *blocks]


def is_diffusers_transformer(f) -> bool:
    return PROBE in f and "pos_embed.pos_embed" in f


def from_diffusers(f) -> RenamedCheckpoint:
    """A diffusers SD3Transformer2DModel checkpoint (file, shards) under the official names (no prefix)."""
    depth = count_indexed(f.keys(), r"transformer_blocks\.(\d+)\.")
    if depth == 0:
        raise CheckpointError(f"{f.path}: no 'transformer_blocks.N.*' keys: not a diffusers SD3 transformer.")
    return to_ours(f, transformer_rules(depth), "diffusers SD3 transformer")


def to_diffusers(f, prefix: str = "model.diffusion_model.") -> RenamedCheckpoint:
    """Our transformer's tensors (keys `prefix + name` in `f`) under diffusers' names."""
    depth = count_indexed(f.keys(), r"joint_blocks\.(\d+)\.", prefix)
    return to_theirs(f, transformer_rules(depth), "diffusers SD3 transformer", prefix=prefix)


def diffusers_sd3_kwargs(config) -> dict:
    """Constructor arguments of diffusers' SD3Transformer2DModel for our config (diffusers is not imported:
    the library never depends on it): the config.json a converted folder carries, and the oracle tests build."""
    return dict(
        sample_size=config.pos_embed_max_size * config.patch_size, patch_size=config.patch_size,
        in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
        attention_head_dim=64, num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
        caption_projection_dim=config.hidden_size, pooled_projection_dim=config.pooled_dim,
        pos_embed_max_size=config.pos_embed_max_size, dual_attention_layers=tuple(config.dual_attention_blocks),
        qk_norm="rms_norm" if config.qk_norm else None,
    )
