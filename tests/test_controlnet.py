"""ControlNet against diffusers' SD3ControlNetModel + SD3Transformer2DModel holding the same random weights (fp32).

Three nets: a diffusers net with a text stream (written by diffusers' save_pretrained, and as a single file), and
an SD3.5 Large-style "8b" net both in diffusers' converted layout and in the official layout (written here from
the diffusers weights by inverting diffusers' own conversion script, scripts/convert_sd3_controlnet_to_diffusers.py,
since diffusers' package has no converter for it). Where the official code and diffusers differ (the official
nets add an output after the last block too), the oracle is diffusers plus that one addition, written out.
"""

import zlib

import pytest
import torch
from safetensors.torch import save_file

import mmditx
from mmditx import load_controlnet, load_mmditx
from tests.mmditx_oracle import diffusers_transformer, rel_error, watch_diffusers_sd3, watch_mmditx
from tests.official import mmditx_layout, write_random_checkpoint

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
HIDDEN, DEPTH, CONTEXT, POOLED, POS = 128, 4, 96, 64, 16


def randomize(module, seed):
    """Every parameter random (diffusers zero-initialises the projections and pos_embed_input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1    # fan-in scaled: activations stay O(1)
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return module.eval()


def joint_net(layers=2):
    from diffusers import SD3ControlNetModel
    return randomize(SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=HIDDEN // 64, joint_attention_dim=CONTEXT, caption_projection_dim=HIDDEN,
        pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=POS, dual_attention_layers=(0,),
        qk_norm="rms_norm", force_zeros_for_pooled_projection=True), seed=1)


def net_8b(layers=2):
    """The configuration of diffusers' conversion of the SD3.5 Large nets, at a tiny size."""
    from diffusers import SD3ControlNetModel
    return randomize(SD3ControlNetModel(
        patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64, num_attention_heads=HIDDEN // 64,
        joint_attention_dim=None, caption_projection_dim=HIDDEN, pooled_projection_dim=POOLED, out_channels=16,
        pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
        force_zeros_for_pooled_projection=False), seed=2)


def official_8b_state(ref, control_type=1):
    """The official file's layout (inverse of diffusers' convert_sd3_controlnet_to_diffusers.py)."""
    sd, out = ref.state_dict(), {}
    for k, v in sd.items():
        if k.startswith(("controlnet_blocks.", "pos_embed_input.", "time_text_embed.")):
            out[k] = v
    n = len(ref.transformer_blocks)
    for i in range(n):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.qkv.{kind}"] = torch.cat([sd[b + f"attn.to_{x}.{kind}"] for x in "qkv"])
            out[b + f"attn.proj.{kind}"] = sd[b + f"attn.to_out.0.{kind}"]
            out[b + f"mlp.fc1.{kind}"] = sd[b + f"ff.net.0.proj.{kind}"]
            out[b + f"mlp.fc2.{kind}"] = sd[b + f"ff.net.2.{kind}"]
            out[b + f"adaLN_modulation.1.{kind}"] = sd[b + f"norm1.linear.{kind}"]
    out["control_type"] = torch.tensor([control_type], dtype=torch.int32)
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("controlnet")
    path = d / "model.safetensors"
    write_random_checkpoint(mmditx_layout(hidden=HIDDEN, depth=DEPTH, dual=(0, 1), pos_max=POS, context_dim=CONTEXT,
                                          pooled_dim=POOLED), path, seed=zlib.crc32(b"controlnet"))
    ours = load_mmditx(path)
    ref = diffusers_transformer(path, ours.config)
    joint, big = joint_net(), net_8b()
    joint.save_pretrained(d / "joint_folder")
    save_file({k: v.contiguous() for k, v in joint.state_dict().items()}, d / "joint.safetensors")
    big.save_pretrained(d / "8b_folder")
    save_file(official_8b_state(big), d / "8b_official.safetensors")
    return dict(dir=d, model_path=path, ours=ours, ref=ref, joint=joint, big=big)


def inputs(batch=2, h=8, w=12, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, h, w, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, tokens, CONTEXT, generator=g), torch.randn(batch, POOLED, generator=g),
            torch.randn(1, 16, h, w, generator=g))


def reference(s, net, x, t, ctx, y, cond, strength, official_last_block=False, skip=()):
    """diffusers' pipeline calls (pipeline_stable_diffusion_3_controlnet.py): its control latent has no shift
    when force_zeros_for_pooled_projection (then the pooled vector is zeros too); 8b nets get the transformer's
    patch embedding and no text."""
    ref = s["ref"]
    zeros = net.config.force_zeros_for_pooled_projection
    cond_ref = cond + (0.0609 * 1.5305 if zeros else 0.0)
    if not net.config.use_pos_embed:
        net.pos_embed = net._get_pos_embed_from_transformer(ref)
    with torch.no_grad():
        samples = net(hidden_states=x, controlnet_cond=cond_ref.expand(x.shape[0], -1, -1, -1),
                      conditioning_scale=strength,
                      encoder_hidden_states=ctx if net.config.joint_attention_dim is not None else None,
                      pooled_projections=torch.zeros_like(y) if zeros else y, timestep=t, return_dict=False)[0]
    return transformer_reference(s, samples, x, t, ctx, y, official_last_block, skip)


def transformer_reference(s, samples, x, t, ctx, y, official_last_block=False, skip=()):
    ref = s["ref"]
    with torch.no_grad():
        with watch_diffusers_sd3(ref) as rec:
            handles = []
            if official_last_block:  # the official code adds an output after the last block as well (hooked
                # after the recorder's hook, so the recorded block output is the block's own, as in ours)
                last, k = ref.transformer_blocks[-1], (DEPTH - 1) * len(samples) // DEPTH
                handles.append(last.register_forward_hook(lambda m, a, o: (o[0], o[1] + samples[k])))
            out = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                      block_controlnet_hidden_states=samples, skip_layers=list(skip) or None, return_dict=False)[0]
            for h in handles:
                h.remove()
    return samples, rec.out, out


def ours_run(s, net, x, t, ctx, y, cond, strength, skip=()):
    model = s["ours"]
    with torch.no_grad():
        tokens = model.x_embedder(x) + model.cropped_pos_embed(x.shape[-2] // 2, x.shape[-1] // 2)
        outs = net(model, x, tokens, t, ctx, y, cond, strength)
        with watch_mmditx(model) as rec:
            v = model(x, t, context=ctx, y=y, skip_layers=skip, controls=[(net, cond, strength)])
    return outs, rec.out, v


def compare(ours, ref):
    outs, stages, v = ours
    samples, ref_stages, ref_v = ref
    assert len(outs) == len(samples)
    for k, (a, b) in enumerate(zip(outs, samples)):
        assert rel_error(a, b) <= TOL, f"control output {k}: {rel_error(a, b):.2e}"
    compared = [k for k in stages if k in ref_stages and k.startswith("block")]
    assert len(compared) == 2 * DEPTH - 1
    for k in compared:
        assert rel_error(stages[k], ref_stages[k]) <= TOL, k
    assert rel_error(v, ref_v) <= TOL, f"output: {rel_error(v, ref_v):.2e}"


@pytest.mark.parametrize("where", ["joint_folder", "joint.safetensors"])
def test_diffusers_joint_net(setup, where):
    net = load_controlnet(setup["dir"] / where)
    assert net.config.variant == "joint" and net.config.zero_pooled and net.config.dual_attention_blocks == (0,)
    args = inputs()
    compare(ours_run(setup, net, *args, 0.7), reference(setup, setup["joint"], *args, 0.7))


def test_diffusers_8b_net(setup):
    net = load_controlnet(setup["dir"] / "8b_folder")
    assert net.config.variant == "8b" and not net.config.zero_pooled and not net.config.last_block
    args = inputs(seed=1)
    compare(ours_run(setup, net, *args, 1.3), reference(setup, setup["big"], *args, 1.3))


def test_official_8b_file(setup):
    net = load_controlnet(setup["dir"] / "8b_official.safetensors")
    assert net.config.variant == "8b" and net.config.last_block and net.control_type == "canny"
    args = inputs(seed=2)
    ours = ours_run(setup, net, *args, 1.0)
    compare(ours, reference(setup, setup["big"], *args, 1.0, official_last_block=True))
    # the one difference to diffusers is real: without the last block's output the result moves
    _, _, plain = reference(setup, setup["big"], *args, 1.0)
    assert rel_error(ours[2], plain) > 1e-3


def test_more_control_outputs_than_blocks_and_skip_layers(setup, tmp_path):
    """8 outputs over 4 main blocks: block i gets output 2i (official i // (N // n) = diffusers int(i / (N / n)));
    skipped blocks get nothing (official), so the oracle is diffusers with the skipped blocks' outputs removed."""
    from diffusers import SD3ControlNetModel  # noqa: F401
    big = net_8b(layers=8)
    big.save_pretrained(tmp_path / "n8")
    net = load_controlnet(tmp_path / "n8")
    assert [net.output_index(i, DEPTH) for i in range(DEPTH)] == [0, 2, 4, None]
    x, t, ctx, y, cond = inputs(seed=3)
    skip = (1,)
    samples, _, _ = reference(setup, big, x, t, ctx, y, cond, 1.0)
    zeroed = [torch.zeros_like(s) if i // 2 in skip else s for i, s in enumerate(samples)]
    with torch.no_grad():
        ref_v = setup["ref"](hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                             block_controlnet_hidden_states=zeroed, skip_layers=list(skip), return_dict=False)[0]
        v = setup["ours"](x, t, context=ctx, y=y, skip_layers=skip, controls=[(net, cond, 1.0)])
    assert rel_error(v, ref_v) <= TOL


def test_two_nets_add(setup):
    a, b = load_controlnet(setup["dir"] / "joint_folder"), load_controlnet(setup["dir"] / "8b_folder")
    x, t, ctx, y, cond = inputs(seed=4)
    ra, _, _ = reference(setup, setup["joint"], x, t, ctx, y, cond, 0.5)
    rb, _, _ = reference(setup, setup["big"], x, t, ctx, y, cond, 0.8)
    with torch.no_grad():
        ref_v = setup["ref"](hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                             block_controlnet_hidden_states=[p + q for p, q in zip(ra, rb)], return_dict=False)[0]
        v = setup["ours"](x, t, context=ctx, y=y, controls=[(a, cond, 0.5), (b, cond, 0.8)])
    assert rel_error(v, ref_v) <= TOL


def test_strength_zero_and_no_controls_are_bit_identical(setup):
    net = load_controlnet(setup["dir"] / "joint_folder")
    x, t, ctx, y, cond = inputs(seed=5)
    with torch.no_grad():
        plain = setup["ours"](x, t, context=ctx, y=y)
        zero = setup["ours"](x, t, context=ctx, y=y, controls=[(net, cond, 0.0)])
        steered = setup["ours"](x, t, context=ctx, y=y, controls=[(net, cond, 1.0)])
    assert torch.equal(plain, zero)
    assert (plain - steered).abs().max() > 1e-3


def test_unshifted_latent_offset_is_the_vae_constants():
    import vae
    assert mmditx.controlnet.UNSHIFTED_LATENT_OFFSET == vae.SHIFT_FACTOR * vae.SCALE_FACTOR


def test_bad_inputs(setup, tmp_path):
    net = load_controlnet(setup["dir"] / "joint_folder")
    x, t, ctx, y, cond = inputs(seed=6)
    model = setup["ours"]
    with pytest.raises(ValueError, match=r"control latent .* must be \(1 or 2, 16, 8, 12\)"):
        model(x, t, context=ctx, y=y, controls=[(net, cond[..., :8], 1.0)])
    with pytest.raises(ValueError, match="triples"):
        model(x, t, context=ctx, y=y, controls=[(cond, net, 1.0)])
    # a net of another width (a "Large" net on this model): named with both
    wide = mmditx.ControlNet(mmditx.controlnet.ControlNetConfig(hidden_size=192, depth=2, pooled_dim=POOLED),
                             source="wide.safetensors")
    with pytest.raises(ValueError, match=r"wide.safetensors \(width 192, 2 blocks\) cannot steer this transformer "
                                         r"\(width 128, 4 blocks\)"):
        model(x, t, context=ctx, y=y, controls=[(wide, cond, 1.0)])
    # a transformer file given as a ControlNet
    with pytest.raises(mmditx.CheckpointError, match="not an SD3 ControlNet.*SD3 transformer"):
        load_controlnet(setup["model_path"])
    with pytest.raises(mmditx.CheckpointError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors")


def test_official_2b_file(setup, tmp_path):
    """The official code's other kind of net: own patch embedding without positions, the pooled vector
    embedded by the main model's y_embedder first, and every block reading the same input (blocks not chained).
    diffusers has no such model: the oracle is that forward written out over diffusers' modules."""
    from diffusers.models.embeddings import PatchEmbed
    from diffusers import SD3ControlNetModel
    small = randomize(SD3ControlNetModel(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                num_attention_heads=HIDDEN // 64, joint_attention_dim=None,
                                caption_projection_dim=HIDDEN, pooled_projection_dim=HIDDEN, out_channels=16,
                                pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                                force_zeros_for_pooled_projection=False), seed=3)
    patch = randomize(PatchEmbed(height=16, width=16, patch_size=2, in_channels=16, embed_dim=HIDDEN,
                                 pos_embed_type=None), seed=4)
    state = official_8b_state(small, control_type=0)
    state.update({f"pos_embed.proj.{k}": v for k, v in (("weight", patch.proj.weight), ("bias", patch.proj.bias))})
    save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp_path / "2b.safetensors")
    net = load_controlnet(tmp_path / "2b.safetensors")
    assert net.config.variant == "2b" and not net.config.chained and net.control_type == "blur"

    x, t, ctx, y, cond = inputs(seed=7)
    ref = setup["ref"]
    with torch.no_grad():
        temb = small.time_text_embed(t, ref.time_text_embed.text_embedder(y))
        h = patch(x) + small.pos_embed_input(cond.expand(2, -1, -1, -1))
        samples = [proj(block(h, temb)) * 0.9 for block, proj in zip(small.transformer_blocks, small.controlnet_blocks)]
    compare(ours_run(setup, net, x, t, ctx, y, cond, 0.9),
            transformer_reference(setup, samples, x, t, ctx, y, official_last_block=True))


@pytest.mark.parametrize("variant", ["8b", "2b"])
def test_random_net_round_trips_through_the_official_layout(setup, tmp_path, variant):
    from mmditx.checkpoint import save_safetensors
    from mmditx.controlnet import official_state_dict, random_controlnet
    net = random_controlnet(setup["ours"].config, 2, variant, "depth", seed=5)
    save_safetensors(official_state_dict(net), tmp_path / "net.safetensors")
    back = load_controlnet(tmp_path / "net.safetensors")
    assert back.config == net.config and back.control_type == "depth"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("where", ["joint_folder", "8b_official.safetensors"])
def test_controlnet_flops_match_the_flop_counter(setup, where):
    """The same counter set-up as tests/test_anatomy.py (math attention backend, in-place addmm counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from instruments.anatomy import controlnet_flops
    from tests.test_anatomy import addmm_inplace_flop
    net, model = load_controlnet(setup["dir"] / where), setup["ours"]
    x, t, ctx, y, cond = inputs(batch=2, h=8, w=12, tokens=7)
    tokens = model.x_embedder(x) + model.cropped_pos_embed(4, 6)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flop})
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        net(model, x, tokens, t, ctx, y, cond, 1.0)
    predicted = sum(controlnet_flops(net.config, model.config, 64, 96, 2, 7).values())
    assert predicted == counter.get_total_flops()
