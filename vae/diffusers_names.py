"""The VAE's tensor names in diffusers' format (AutoencoderKL), and ours (the official file's, LDM's).

One table, read both ways (see mmditx/checkpoint.py's `Rename`): loading a diffusers `vae/` folder maps its
tensors to ours as they are read, scripts/convert.py writes ours under diffusers' names. Beyond names:
  - diffusers numbers the decoder's levels in the order they run (up_blocks.0 first, at the lowest resolution),
    the official file by resolution (up.{levels-1} runs first);
  - the mid-block attention's q, k, v and output projection are linear layers in diffusers, 1x1 convolutions
    in the official file (same numbers, shape (C, C) vs (C, C, 1, 1): a view, no copy).
Checked against diffusers' own `convert_ldm_vae_checkpoint` by tests/test_model_formats.py.
"""

from __future__ import annotations

from mmditx.checkpoint import CheckpointError, Rename, RenamedCheckpoint, count_indexed, to_ours, to_theirs

PROBE = "decoder.up_blocks.0.resnets.0.conv1.weight"


def _resnet(ours: str, theirs: str) -> list[Rename]:
    return [Rename(f"{ours}.{n}.{{w}}", f"{theirs}.{m}.{{w}}")
            for n, m in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                         ("nin_shortcut", "conv_shortcut"))]


def _mid(part: str) -> list[Rename]:
    ours, theirs = f"{part}.mid", f"{part}.mid_block"
    return [*_resnet(f"{ours}.block_1", f"{theirs}.resnets.0"), *_resnet(f"{ours}.block_2", f"{theirs}.resnets.1"),
            Rename(f"{ours}.attn_1.norm.{{w}}", f"{theirs}.attentions.0.group_norm.{{w}}"),
            *(r for n, m in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
              for r in (Rename(f"{ours}.attn_1.{n}.weight", f"{theirs}.attentions.0.{m}.weight", conv1x1=True),
                        Rename(f"{ours}.attn_1.{n}.bias", f"{theirs}.attentions.0.{m}.bias")))]


def vae_rules(levels: int) -> list[Rename]:
    """The naming rules for a VAE with `levels` resolution levels."""
    rules = []
    for part in ("encoder", "decoder"):
        rules += [Rename(f"{part}.conv_in.{{w}}", f"{part}.conv_in.{{w}}"),
                  Rename(f"{part}.norm_out.{{w}}", f"{part}.conv_norm_out.{{w}}"),
                  Rename(f"{part}.conv_out.{{w}}", f"{part}.conv_out.{{w}}"), *_mid(part)]
    rules += _resnet("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}")
    rules.append(Rename("encoder.down.{i}.downsample.conv.{w}", "encoder.down_blocks.{i}.downsamplers.0.conv.{w}"))
    for i in range(levels):
        level = levels - 1 - i
        rules += _resnet(f"decoder.up.{level}.block.{{j}}", f"decoder.up_blocks.{i}.resnets.{{j}}")
        rules.append(Rename(f"decoder.up.{level}.upsample.conv.{{w}}", f"decoder.up_blocks.{i}.upsamplers.0.conv.{{w}}"))
    return rules


def is_diffusers_vae(f) -> bool:
    return PROBE in f


def from_diffusers(f) -> RenamedCheckpoint:
    """A diffusers AutoencoderKL checkpoint under the official names (encoder.*, decoder.*, no prefix)."""
    levels = count_indexed(f.keys(), r"decoder\.up_blocks\.(\d+)\.")
    if levels == 0:
        raise CheckpointError(f"{f.path}: no 'decoder.up_blocks.N.*' keys: not a diffusers VAE.")
    return to_ours(f, vae_rules(levels), "diffusers VAE")


def to_diffusers(f, prefix: str = "first_stage_model.") -> RenamedCheckpoint:
    """Our VAE's tensors (keys `prefix + name` in `f`) under diffusers' names."""
    levels = count_indexed(f.keys(), r"decoder\.up\.(\d+)\.", prefix)
    return to_theirs(f, vae_rules(levels), "diffusers VAE", prefix=prefix)


def diffusers_vae_kwargs(config) -> dict:
    """Constructor arguments of diffusers' AutoencoderKL for our VAEConfig (SD3: no quant convs)."""
    levels = len(config.ch_mult)
    return dict(
        in_channels=config.in_channels, out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult), layers_per_block=config.num_res_blocks,
        act_fn="silu", latent_channels=config.z_channels, norm_num_groups=32, sample_size=64,
        scaling_factor=config.scale_factor, shift_factor=config.shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True,
    )
